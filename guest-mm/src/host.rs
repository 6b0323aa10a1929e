//! Host operations behind a small trait, so that the allocator core makes no syscalls.
//!
//! The VMM implements [`HostOps`] over its real mappings (madvise, fallocate, mbind); tests
//! use [`RecordingHost`], which records every call.

use crate::frame::{FrameId, NodeId};
use std::sync::Mutex;

/// A contiguous run of frames.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FrameRange {
    /// First frame.
    pub start: FrameId,
    /// Number of frames (never zero for a valid range).
    pub count: u64,
}

impl FrameRange {
    /// A new range.
    pub const fn new(start: FrameId, count: u64) -> Self {
        FrameRange { start, count }
    }

    /// One past the last frame.
    pub const fn end(&self) -> FrameId {
        FrameId(self.start.0 + self.count)
    }
}

/// Error returned by a host operation.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("host operation {op} failed on {range:?}: {reason}")]
pub struct HostError {
    /// Which operation failed.
    pub op: &'static str,
    /// The range it was applied to.
    pub range: FrameRange,
    /// Why (an errno string on a real host).
    pub reason: String,
}

/// Host-side operations on the pool's backing memory.
pub trait HostOps: Send + Sync {
    /// Make the range resident (prefault), e.g. `MADV_POPULATE_WRITE`.
    fn populate(&self, range: FrameRange) -> Result<(), HostError>;
    /// Give the range's host memory back; the next touch reads zeroes.
    fn discard(&self, range: FrameRange) -> Result<(), HostError>;
    /// Ask for huge-page backing (`MADV_HUGEPAGE`).
    fn advise_huge(&self, range: FrameRange) -> Result<(), HostError>;
    /// Bind the range to a host node (`mbind`).
    fn bind(&self, range: FrameRange, node: NodeId) -> Result<(), HostError>;
}

/// One recorded call of [`RecordingHost`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HostCall {
    /// `populate(range)`.
    Populate(FrameRange),
    /// `discard(range)`.
    Discard(FrameRange),
    /// `advise_huge(range)`.
    AdviseHuge(FrameRange),
    /// `bind(range, node)`.
    Bind(FrameRange, NodeId),
}

/// A [`HostOps`] that records calls instead of making syscalls. It can be told to fail.
#[derive(Debug, Default)]
pub struct RecordingHost {
    calls: Mutex<Vec<HostCall>>,
    fail: Mutex<Option<String>>,
}

impl RecordingHost {
    /// A recorder that succeeds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Make every later call fail with `reason` (or succeed again with `None`).
    pub fn set_failure(&self, reason: Option<&str>) {
        *self.fail.lock().unwrap_or_else(|e| e.into_inner()) = reason.map(str::to_owned);
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<HostCall> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Total frames passed to `discard`.
    pub fn discarded_frames(&self) -> u64 {
        self.calls()
            .iter()
            .map(|c| match c {
                HostCall::Discard(r) => r.count,
                _ => 0,
            })
            .sum()
    }

    fn record(&self, op: &'static str, call: HostCall, range: FrameRange) -> Result<(), HostError> {
        if let Some(reason) = self.fail.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(HostError { op, range, reason });
        }
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
        Ok(())
    }
}

impl HostOps for RecordingHost {
    fn populate(&self, range: FrameRange) -> Result<(), HostError> {
        self.record("populate", HostCall::Populate(range), range)
    }
    fn discard(&self, range: FrameRange) -> Result<(), HostError> {
        self.record("discard", HostCall::Discard(range), range)
    }
    fn advise_huge(&self, range: FrameRange) -> Result<(), HostError> {
        self.record("advise_huge", HostCall::AdviseHuge(range), range)
    }
    fn bind(&self, range: FrameRange, node: NodeId) -> Result<(), HostError> {
        self.record("bind", HostCall::Bind(range, node), range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_fails_on_demand() {
        let h = RecordingHost::new();
        let r = FrameRange::new(FrameId(512), 512);
        h.discard(r).unwrap();
        h.bind(r, NodeId(1)).unwrap();
        assert_eq!(
            h.calls(),
            vec![HostCall::Discard(r), HostCall::Bind(r, NodeId(1))]
        );
        assert_eq!(h.discarded_frames(), 512);
        h.set_failure(Some("EIO"));
        let e = h.populate(r).unwrap_err();
        assert_eq!(e.op, "populate");
        assert_eq!(h.calls().len(), 2);
    }
}
