"""Restricts the shapes-world model's text encoder to the vocabulary its world uses, without changing any output.

`diffpref pretrain` trains the shapes model's text encoder from scratch with the real 49,408-token CLIP tokenizer,
but the world's captions use ~40 words: all other rows of the token embedding were never trained, yet they were
6.3 of the model's 11 MB (plus 3.2 MB of tokenizer files). This keeps

* the CLIP BPE tokenizer's first 1,000 merges (common English pieces, so other words still tokenize sensibly)
  plus every merge the real tokenizer applies to a word of the world (the caption grammar's words in
  `reward_models/src/shapes.rs` and every word of the shipped prompt lists and preference manifest), in their
  original order. BPE applies the best-ranked applicable merge at each step; the merges dropped are never applied
  to those words, so each of them tokenizes into exactly the same pieces as before;
* the vocabulary: the 512 byte tokens, one token per kept merge, then `<|startoftext|>` / `<|endoftext|>` (last,
  so the pooled output, taken at argmax(input_ids), still lands on the first `<|endoftext|>`);
* the token embedding rows of those tokens, in that order; every other weight unchanged.

So for any prompt made of the world's words the text encoder sees the same embedding rows at the same positions
and its outputs are bit-identical (checked here on every shipped prompt with transformers); only out-of-world words
(whose rows were never trained) split into other pieces. Writes vocab.json + merges.txt (no tokenizer.json).

Usage: python scripts/shrink_shapes_vocab.py [MODEL_DIR=assets/tiny-shapes]
"""
import glob
import json
import os
import re
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures", "parity"))
from make_small_tokenizer import restrict_embedding  # noqa: E402  (the fixtures' vocabulary helpers)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def applied_merges(word, ranks):
    """The ranks of the merges CLIP's BPE applies to one pre-token (lower-cased word)."""
    b2u = bytes_to_unicode()
    sym = [b2u[b] for b in word.encode("utf-8")]
    sym[-1] = sym[-1] + "</w>"
    used = set()
    while len(sym) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(sym, sym[1:]))]
        r, _ = min(pairs)
        if r == 1 << 30:
            break
        used.add(r)
        a, b = next((sym[i], sym[i + 1]) for rr, i in pairs if rr == r)
        out, i = [], 0
        while i < len(sym):
            if i < len(sym) - 1 and sym[i] == a and sym[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(sym[i])
                i += 1
        sym = out
    return used


def world_words():
    words = set(re.findall(r'"([a-z]+)"', open(os.path.join(ROOT, "reward_models/src/shapes.rs")).read()))
    texts = [open(p).read() for p in glob.glob(os.path.join(ROOT, "assets/shapes/*.txt"))]
    for m in glob.glob(os.path.join(ROOT, "assets/shapes/*/manifest.jsonl")):
        texts += [json.loads(line)["prompt"] for line in open(m) if line.strip()]
    for t in texts:
        words |= set(re.findall(r"[a-z]+", t.lower()))
    return sorted(words), texts


def main(model):
    tok = os.path.join(model, "tokenizer")
    vocab = json.load(open(os.path.join(tok, "vocab.json"), encoding="utf-8"))
    lines = [l for l in open(os.path.join(tok, "merges.txt"), encoding="utf-8").read().split("\n")]
    header, merges = lines[0], [tuple(m.split(" ")) for m in lines[1:] if m]
    if len(vocab) < 49408:
        print("already restricted:", len(vocab), "tokens")
        return
    ranks = {m: i for i, m in enumerate(merges)}
    words, texts = world_words()
    keep = set(range(1000))
    for w in words:
        keep |= applied_merges(w, ranks)
    keep = sorted(keep)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    new_tokens = [t for t, _ in by_id[:512]] + ["".join(merges[r]) for r in keep] + ["<|startoftext|>", "<|endoftext|>"]
    new_vocab = {t: i for i, t in enumerate(new_tokens)}
    assert len(new_vocab) == len(new_tokens)

    # the check: every shipped text tokenizes into the same pieces, and the encoder's outputs are identical
    from transformers import CLIPTextModel, CLIPTokenizer
    old_tok = CLIPTokenizer.from_pretrained(tok)
    old_te = CLIPTextModel.from_pretrained(os.path.join(model, "text_encoder"), dtype=torch.float32).eval()

    te = os.path.join(model, "text_encoder")
    restrict_embedding(os.path.join(te, "model.safetensors"), "text_model.embeddings.token_embedding.weight",
                       vocab, new_vocab, os.path.join(te, "config.json"), ["vocab_size"])
    with open(os.path.join(tok, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(new_vocab, f, ensure_ascii=False)
    with open(os.path.join(tok, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join([header] + [" ".join(merges[r]) for r in keep]) + "\n")
    if os.path.exists(os.path.join(tok, "tokenizer.json")):
        os.remove(os.path.join(tok, "tokenizer.json"))

    new_tok = CLIPTokenizer.from_pretrained(tok)
    new_te = CLIPTextModel.from_pretrained(os.path.join(model, "text_encoder"), dtype=torch.float32).eval()
    prompts = sorted({l.strip() for t in texts for l in t.split("\n") if l.strip()} | set(words) | {""})
    worst = 0.0
    with torch.no_grad():
        for i in range(0, len(prompts), 64):
            batch = prompts[i:i + 64]
            a = old_tok(batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            b = new_tok(batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            assert [old_tok.convert_ids_to_tokens(x) for x in a.tolist()] == \
                   [new_tok.convert_ids_to_tokens(x) for x in b.tolist()], "tokenization changed"
            oa, ob = old_te(a), new_te(b)
            worst = max(worst, (oa.last_hidden_state - ob.last_hidden_state).abs().max().item(),
                        (oa.pooler_output - ob.pooler_output).abs().max().item())
    assert worst == 0.0, worst
    print(f"{len(words)} world words, {len(keep)} merges kept, vocabulary {len(new_vocab)}; "
          f"{len(prompts)} prompts: same tokens, text encoder outputs identical")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "assets", "tiny-shapes"))
