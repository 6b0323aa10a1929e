//! [`VmSwap`] as the reclaim engine's [`SwapHook`] (phases 3 and 4).

use std::ops::Range;

use super::{SwapError, VmSwap};
use crate::reclaim::{SwapHook, TargetError};

fn target_error(e: SwapError) -> TargetError {
    match e {
        SwapError::Closed => TargetError::Gone,
        SwapError::Unsupported(k) => TargetError::Unsupported(format!("swap on {k} backing")),
        e => TargetError::Failed(e.to_string()),
    }
}

impl SwapHook for VmSwap {
    /// Phase 3: discard clean pages of the cold ranges, without I/O, up to `max_bytes`.
    fn drop_clean(&self, cold: &[Range<u64>], max_bytes: u64) -> Result<u64, TargetError> {
        let mut freed = 0;
        for r in cold {
            if freed >= max_bytes {
                break;
            }
            freed += self
                .drop_clean_max(r.clone(), max_bytes - freed)
                .map_err(target_error)?;
        }
        Ok(freed)
    }

    /// Phase 4: write the cold ranges out (clustered, paced) and discard them, up to
    /// `max_bytes` released. A full swap file ends the call with what was released so far
    /// (an error only if that is nothing).
    fn swap_out(&self, cold: &[Range<u64>], max_bytes: u64) -> Result<u64, TargetError> {
        let mut freed = 0;
        for r in cold {
            if freed >= max_bytes {
                break;
            }
            let s = VmSwap::swap_out(self, r.clone(), max_bytes - freed).map_err(target_error)?;
            freed += s.reclaimed_bytes();
            if s.full {
                if freed == 0 {
                    return Err(TargetError::Failed("swap file full".into()));
                }
                break;
            }
        }
        Ok(freed)
    }
}
