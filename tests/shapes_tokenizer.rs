//! The shipped shapes model's restricted vocabulary (`scripts/shrink_shapes_vocab.py`: the real CLIP tokenizer's
//! first 1,000 merges plus every merge it applies to a word of the world) tokenizes every caption of its world
//! into the same pieces as the real CLIP tokenizer the model was trained with — so the text encoder sees the same
//! embedding rows. A caption grammar that gains a word the vocabulary does not cover fails here.

use diffpref::data::shapes::random_scenes;
use diffpref_pipelines::tokenizer::ClipTokenizer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// id -> token string of a tokenizer folder's vocab.json.
fn tokens_by_id(dir: &Path) -> HashMap<u32, String> {
    let text = std::fs::read_to_string(dir.join("vocab.json")).unwrap();
    let vocab: HashMap<String, u32> = serde_json::from_str(&text).unwrap();
    vocab.into_iter().map(|(t, i)| (i, t)).collect()
}

fn pieces(tok: &ClipTokenizer, names: &HashMap<u32, String>, text: &str) -> Vec<String> {
    tok.encode(text)
        .unwrap()
        .iter()
        .map(|i| names[i].clone())
        .collect()
}

#[test]
fn the_shapes_vocabulary_tokenizes_its_world_like_the_real_clip_tokenizer() {
    let small_dir = root().join("assets/tiny-shapes/tokenizer");
    let real_dir = root().join("tests/fixtures/clip-tokenizer");
    let (small, real) = (
        ClipTokenizer::from_dir(&small_dir).unwrap(),
        ClipTokenizer::from_dir(&real_dir).unwrap(),
    );
    let (small_names, real_names) = (tokens_by_id(&small_dir), tokens_by_id(&real_dir));
    assert!(
        small_names.len() < real_names.len(),
        "the shipped vocabulary is the restricted one"
    );

    // Captions of the grammar (every colour, shape, count, size and relation it writes) and every shipped text.
    let mut texts: Vec<String> = (0..4)
        .flat_map(|seed| random_scenes(seed, 500, 3))
        .map(|s| s.caption())
        .collect();
    for f in [
        "train-prompts.txt",
        "heldout-prompts.txt",
        "validation-prompts.txt",
    ] {
        let t = std::fs::read_to_string(root().join("assets/shapes").join(f)).unwrap();
        texts.extend(t.lines().filter(|l| !l.trim().is_empty()).map(String::from));
    }
    let manifest =
        std::fs::read_to_string(root().join("assets/shapes/demo-prefs/manifest.jsonl")).unwrap();
    for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        texts.push(v["prompt"].as_str().unwrap().to_string());
    }
    texts.sort();
    texts.dedup();
    assert!(texts.len() > 300, "{} texts", texts.len());
    for t in &texts {
        assert_eq!(
            pieces(&small, &small_names, t),
            pieces(&real, &real_names, t),
            "{t:?} tokenizes differently with the shipped vocabulary"
        );
    }
}
