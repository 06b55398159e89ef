//! [`PairDataset`]: preference pairs from a manifest or Pick-a-Pic shards, served in a deterministic shuffled
//! order that wraps around epochs and can be resumed from a saved [`DatasetPosition`].
//!
//! Epoch `e`'s order is a Fisher–Yates shuffle drawn from `Rng::derive(seed, "pair-order/e")`, so it depends only
//! on the seed and the epoch number: seeking to a position needs no random state, and a resumed run sees the
//! same pairs in the same order as an uninterrupted one.

use crate::data::latents::load_latent;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::manifest::{load_manifest, ManifestOptions, PreferencePair, SkipReport};
use super::pickapic::{PairImages, PickapicIndex, PickapicOptions};
use crate::imaging::load_image;
use crate::train::rng::Rng;

/// Where the next pair comes from: `index` into epoch `epoch`'s order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DatasetPosition {
    pub epoch: u64,
    pub index: usize,
}

/// The pairs behind a [`PairDataset`].
#[derive(Debug)]
pub enum PairSource {
    /// Image paths from a manifest (images are read when a batch is loaded).
    Manifest(Vec<PreferencePair>),
    /// Pick-a-Pic shards (image bytes read on demand).
    Pickapic(PickapicIndex),
}

/// A pair as handed out by [`PairDataset::next_refs`]: its index in the source and, for manifests, its paths
/// (e.g. for path-keyed latent caches) without loading any image.
#[derive(Clone, Debug, PartialEq)]
pub struct PairRef {
    pub index: usize,
    pub paths: Option<PreferencePair>,
}

/// Shuffled, resumable access to preference pairs.
#[derive(Debug)]
pub struct PairDataset {
    source: PairSource,
    seed: u64,
    shuffle: bool,
    pos: DatasetPosition,
    order: Vec<usize>,
    order_epoch: Option<u64>,
}

impl PairDataset {
    /// A dataset over `source`; `shuffle: false` serves pairs in source order every epoch.
    pub fn new(source: PairSource, seed: u64, shuffle: bool) -> Self {
        PairDataset {
            source,
            seed,
            shuffle,
            pos: DatasetPosition::default(),
            order: Vec::new(),
            order_epoch: None,
        }
    }

    /// A shuffled dataset whose seed is drawn from `rng` (one draw).
    pub fn from_rng(source: PairSource, rng: &mut Rng) -> Self {
        Self::new(source, rng.next_u64(), true)
    }

    /// Reads a manifest (see [`load_manifest`]).
    pub fn from_manifest(
        path: impl AsRef<Path>,
        opts: &ManifestOptions,
        seed: u64,
    ) -> Result<(Self, SkipReport)> {
        let (pairs, report) = load_manifest(path, opts)?;
        Ok((Self::new(PairSource::Manifest(pairs), seed, true), report))
    }

    /// Indexes Pick-a-Pic shards (see [`PickapicIndex::open`]).
    pub fn from_parquet(
        paths: &[PathBuf],
        opts: &PickapicOptions,
        seed: u64,
    ) -> Result<(Self, SkipReport)> {
        let (index, report) = PickapicIndex::open(paths, opts)?;
        Ok((Self::new(PairSource::Pickapic(index), seed, true), report))
    }

    pub fn source(&self) -> &PairSource {
        &self.source
    }

    pub fn len(&self) -> usize {
        match &self.source {
            PairSource::Manifest(p) => p.len(),
            PairSource::Pickapic(i) => i.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The position of the next pair (save it with a checkpoint).
    pub fn position(&self) -> DatasetPosition {
        self.pos
    }

    /// Continues from a saved position. `index == len` is the start of the next epoch.
    pub fn seek(&mut self, pos: DatasetPosition) -> Result<()> {
        let n = self.len();
        ensure!(
            pos.index <= n,
            "dataset position {}:{} is beyond the {n} pairs of an epoch (was the data changed since the \
             checkpoint?)",
            pos.epoch,
            pos.index
        );
        self.pos = if pos.index == n && n > 0 {
            DatasetPosition {
                epoch: pos.epoch + 1,
                index: 0,
            }
        } else {
            pos
        };
        Ok(())
    }

    /// The order of epoch `epoch` (indices into the source).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if self.shuffle {
            Rng::derive(self.seed, &format!("pair-order/{epoch}")).shuffle(&mut order);
        }
        order
    }

    /// The source indices of the next `n` pairs, wrapping into following epochs.
    pub fn next_indices(&mut self, n: usize) -> Result<Vec<usize>> {
        let len = self.len();
        ensure!(len > 0 || n == 0, "the dataset has no pairs");
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.order_epoch != Some(self.pos.epoch) {
                self.order = self.epoch_order(self.pos.epoch);
                self.order_epoch = Some(self.pos.epoch);
            }
            out.push(self.order[self.pos.index]);
            self.pos.index += 1;
            if self.pos.index == len {
                self.pos = DatasetPosition {
                    epoch: self.pos.epoch + 1,
                    index: 0,
                };
            }
        }
        Ok(out)
    }

    /// The next `n` pairs without loading images.
    pub fn next_refs(&mut self, n: usize) -> Result<Vec<PairRef>> {
        let idx = self.next_indices(n)?;
        Ok(idx
            .into_iter()
            .map(|index| PairRef {
                index,
                paths: match &self.source {
                    PairSource::Manifest(p) => Some(p[index].clone()),
                    PairSource::Pickapic(_) => None,
                },
            })
            .collect())
    }

    /// Loads pair `index` of the source with its images.
    pub fn load(&mut self, index: usize) -> Result<PairImages> {
        match &mut self.source {
            PairSource::Manifest(pairs) => {
                let p = pairs.get(index).with_context(|| {
                    format!("pair {index} out of range ({} pairs)", pairs.len())
                })?;
                let chosen = load_image(&p.chosen)
                    .with_context(|| format!("{}: key \"chosen\"", p.source))?;
                let rejected = load_image(&p.rejected)
                    .with_context(|| format!("{}: key \"rejected\"", p.source))?;
                let latents = match &p.latents {
                    Some((c, r)) => Some((
                        load_latent(c)
                            .with_context(|| format!("{}: key \"chosen_latent\"", p.source))?,
                        load_latent(r)
                            .with_context(|| format!("{}: key \"rejected_latent\"", p.source))?,
                    )),
                    None => None,
                };
                Ok(PairImages {
                    prompt: p.prompt.clone(),
                    chosen,
                    rejected,
                    label: p.label,
                    source: p.source.clone(),
                    latents,
                })
            }
            PairSource::Pickapic(index_) => index_.get(index),
        }
    }

    /// The next `n` pairs with decoded images, wrapping into following epochs. On an error the position has
    /// already moved past the batch.
    pub fn next_batch(&mut self, n: usize) -> Result<Vec<PairImages>> {
        let idx = self.next_indices(n)?;
        idx.into_iter().map(|i| self.load(i)).collect()
    }
}
