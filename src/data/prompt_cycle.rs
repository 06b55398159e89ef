//! Training prompts for the online methods, cycled in a seeded shuffled order that is redrawn every epoch and
//! restored from `(epoch, index)` on resume.

use crate::train::rng::Rng;

/// The prompts of one run in epoch order: epoch `e` is a shuffle drawn from `Rng::derive(seed, "<name>-prompts/e")`.
#[derive(Clone, Debug)]
pub struct PromptCycle {
    prompts: Vec<String>,
    seed: u64,
    name: String,
    epoch: u64,
    index: usize,
    order: Vec<usize>,
}

impl PromptCycle {
    /// `name` names the random stream (`grpo`, `lpo`, `spo`).
    pub fn new(prompts: Vec<String>, seed: u64, name: &str) -> PromptCycle {
        let mut c = PromptCycle {
            prompts,
            seed,
            name: name.to_string(),
            epoch: 0,
            index: 0,
            order: Vec::new(),
        };
        c.order = c.order_for(0);
        c
    }

    fn order_for(&self, epoch: u64) -> Vec<usize> {
        let mut o: Vec<usize> = (0..self.prompts.len()).collect();
        Rng::derive(self.seed, &format!("{}-prompts/{epoch}", self.name)).shuffle(&mut o);
        o
    }

    /// The next prompt (a new epoch's order once every prompt was drawn).
    pub fn next_prompt(&mut self) -> String {
        if self.index >= self.prompts.len() {
            self.epoch += 1;
            self.index = 0;
            self.order = self.order_for(self.epoch);
        }
        let p = self.prompts[self.order[self.index]].clone();
        self.index += 1;
        p
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// `(epoch, index)`: where the cycle stands (for checkpoints).
    pub fn position(&self) -> (u64, usize) {
        (self.epoch, self.index)
    }

    /// Restores a [`PromptCycle::position`].
    pub fn seek(&mut self, epoch: u64, index: usize) {
        self.epoch = epoch;
        self.index = index;
        self.order = self.order_for(epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_draws_each_prompt_once_and_seeking_resumes_the_sequence() {
        let prompts: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
        let mut c = PromptCycle::new(prompts.clone(), 3, "test");
        let drawn: Vec<String> = (0..12).map(|_| c.next_prompt()).collect();
        for e in 0..2 {
            let mut epoch = drawn[e * 5..e * 5 + 5].to_vec();
            epoch.sort();
            assert_eq!(epoch, prompts);
        }
        assert_ne!(drawn[..5], drawn[5..10], "each epoch its own order");
        let mut d = PromptCycle::new(prompts, 3, "test");
        for _ in 0..7 {
            d.next_prompt();
        }
        let (e, i) = d.position();
        let mut r = PromptCycle::new(
            vec![
                "p0".into(),
                "p1".into(),
                "p2".into(),
                "p3".into(),
                "p4".into(),
            ],
            3,
            "test",
        );
        r.seek(e, i);
        let rest: Vec<String> = (0..5).map(|_| r.next_prompt()).collect();
        assert_eq!(rest, drawn[7..12]);
    }
}
