//! Input checks shared by every backend, so that all of them reject the same inputs the same way.

use crate::api::config::CrossEntropy;
use crate::error::{Result, XentError};

/// Checks the shapes and options of a class-index cross-entropy call.
pub(crate) fn ce_inputs(n: usize, v: usize, targets: usize, cfg: &CrossEntropy) -> Result<()> {
    if v == 0 {
        return Err(XentError::Shape(format!("logits [{n}, 0] have no classes")));
    }
    if targets != n {
        return Err(XentError::Shape(format!(
            "logits have {n} rows but targets have {targets}"
        )));
    }
    if let Some(w) = &cfg.sample_weight {
        if w.len() != n {
            return Err(XentError::Shape(format!(
                "sample_weight has {} entries but the logits have {n} rows",
                w.len()
            )));
        }
    }
    if v > i32::MAX as usize {
        return Err(XentError::Shape(format!(
            "{v} classes do not fit 32-bit class indices"
        )));
    }
    cfg.validate(v)
}
