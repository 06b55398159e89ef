//! Reward models for diffpref (filled by the reward-model issue).
