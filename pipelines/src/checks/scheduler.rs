//! Scheduler checks (owned by the schedulers work).
use super::CheckContext;
use crate::golden::{Comparison, Golden};
use crate::Result;

pub fn check_scheduler(_g: &Golden, _c: &CheckContext) -> Result<Vec<Comparison>> {
    Err(crate::Error::msg("scheduler check not written yet"))
}
pub fn check_common(_g: &Golden, _c: &CheckContext) -> Result<Vec<Comparison>> {
    Err(crate::Error::msg("scheduler_common check not written yet"))
}
pub fn check_timesteps(_g: &Golden, _c: &CheckContext) -> Result<Vec<Comparison>> {
    Err(crate::Error::msg("scheduler_timesteps check not written yet"))
}
pub fn check_ddim_logprob(_g: &Golden, _c: &CheckContext) -> Result<Vec<Comparison>> {
    Err(crate::Error::msg("ddim_logprob check not written yet"))
}
