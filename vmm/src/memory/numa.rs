//! Host NUMA placement of memory ranges: a small safe layer over the `mbind`, `get_mempolicy`,
//! `set_mempolicy` and `move_pages` system calls (issued through `libc::syscall`, so no libnuma
//! is needed).
//!
//! - [`HostNuma`]: the host's node numbering (`/sys/devices/system/node/{possible,online}`),
//!   which sizes the node masks the calls take; [`HostNuma::get`] reads it once per process.
//! - [`bind_range`]: `mbind(MPOL_BIND)` of a range to one node, optionally moving the pages
//!   already there (`MPOL_MF_MOVE | MPOL_MF_STRICT`). On an anonymous private mapping the
//!   policy belongs to the mapping; on a shared memfd (shmem) mapping it becomes the *file's*
//!   shared policy for those offsets, so every mapping of the file allocates them on the node.
//! - [`range_policy`]: the policy in force at an address (`get_mempolicy(MPOL_F_ADDR)`).
//! - [`nodes_of_pages`] / [`node_of_page`]: where the pages behind addresses physically are
//!   (`move_pages` with no target nodes: a query that never faults a page in).
//! - [`ThreadPolicy`]: a scoped `set_mempolicy` of the calling thread (for allocations that
//!   no mapping's policy governs, such as `fallocate` on a hugetlbfs file).
//!
//! See `docs/memory-window.md` ("NUMA binding") for how the backings use it.

use std::sync::OnceLock;

use guest_mm::frame::NodeId;

const MPOL_DEFAULT: i32 = 0;
const MPOL_PREFERRED: i32 = 1;
const MPOL_BIND: i32 = 2;
const MPOL_INTERLEAVE: i32 = 3;
const MPOL_LOCAL: i32 = 4;
const MPOL_F_ADDR: u64 = 1 << 1;
const MPOL_MF_STRICT: u32 = 1;
const MPOL_MF_MOVE: u32 = 1 << 1;

/// Host page size the calls work in.
const PAGE: usize = 4096;

/// Errors of the NUMA calls.
#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Syscall {
        /// The call.
        call: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The node is not a possible node of this host.
    #[error("host NUMA node {node} does not exist (highest possible node: {max})")]
    NoSuchNode {
        /// The node asked for.
        node: u16,
        /// The highest possible node.
        max: u16,
    },
    /// The range is empty or not page aligned.
    #[error("range [{addr:#x}, +{len:#x}) is not a non-empty 4 KiB-aligned range")]
    Unaligned {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// `MPOL_MF_MOVE | MPOL_MF_STRICT`: some pages already in the range could not be moved to
    /// the node (pinned, shared with another process, or the node is full); the policy is set.
    #[error("some pages of [{addr:#x}, +{len:#x}) could not be moved to node {node}")]
    NotMoved {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
        /// Target node.
        node: u16,
    },
    /// The host's node list could not be read or parsed.
    #[error("host NUMA topology: {0}")]
    Topology(String),
    /// The kernel answered with a policy mode this module does not know.
    #[error("unknown memory policy mode {0}")]
    UnknownMode(i32),
}

fn last_os(call: &'static str) -> NumaError {
    NumaError::Syscall {
        call,
        source: std::io::Error::last_os_error(),
    }
}

/// The host's NUMA node numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNuma {
    /// Highest possible node id (sizes node masks).
    max_node: u16,
    /// Online nodes (with or without memory), ascending.
    online: Vec<u16>,
}

/// Parse a sysfs node list such as `0`, `0-3` or `0,2-3`.
pub fn parse_node_list(s: &str) -> Result<Vec<u16>, NumaError> {
    let bad = || NumaError::Topology(format!("cannot parse node list {s:?}"));
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: u16 = a.trim().parse().map_err(|_| bad())?;
        let b: u16 = b.trim().parse().map_err(|_| bad())?;
        if b < a {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

const NODE_SYSFS: &str = "/sys/devices/system/node";

impl HostNuma {
    /// A topology from its parts (for tests and for hosts described elsewhere).
    pub fn new(max_node: u16, online: Vec<u16>) -> HostNuma {
        HostNuma { max_node, online }
    }

    /// Read the host's topology from sysfs. A kernel without NUMA support (no node directory)
    /// is one node, 0.
    pub fn read() -> Result<HostNuma, NumaError> {
        let read = |f: &str| std::fs::read_to_string(format!("{NODE_SYSFS}/{f}"));
        let possible = match read("possible") {
            Ok(s) => parse_node_list(&s)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(HostNuma::new(0, vec![0]))
            }
            Err(e) => return Err(NumaError::Topology(format!("{NODE_SYSFS}/possible: {e}"))),
        };
        let online = match read("online") {
            Ok(s) => parse_node_list(&s)?,
            Err(e) => return Err(NumaError::Topology(format!("{NODE_SYSFS}/online: {e}"))),
        };
        let max_node = possible
            .iter()
            .chain(online.iter())
            .copied()
            .max()
            .unwrap_or(0);
        Ok(HostNuma { max_node, online })
    }

    /// The host's topology, read once per process (a host whose sysfs cannot be read counts
    /// as one node, so no binding is attempted).
    pub fn get() -> &'static HostNuma {
        static HOST: OnceLock<HostNuma> = OnceLock::new();
        HOST.get_or_init(|| {
            HostNuma::read().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "NUMA topology unreadable; treating the host as one node");
                HostNuma::new(0, vec![0])
            })
        })
    }

    /// Highest possible node id.
    pub fn max_node(&self) -> u16 {
        self.max_node
    }

    /// Online nodes, ascending.
    pub fn online(&self) -> &[u16] {
        &self.online
    }

    /// Whether more than one node is online: only then is binding worth its calls.
    pub fn is_multi_node(&self) -> bool {
        self.online.len() > 1
    }

    /// Bits in the masks passed to the kernel: the possible nodes, rounded up to whole words.
    fn mask_bits(&self) -> usize {
        (usize::from(self.max_node) + 1).div_ceil(64) * 64
    }

    fn mask_of(&self, nodes: &[u16]) -> Result<Vec<u64>, NumaError> {
        let mut mask = vec![0u64; self.mask_bits() / 64];
        for &n in nodes {
            if n > self.max_node {
                return Err(NumaError::NoSuchNode {
                    node: n,
                    max: self.max_node,
                });
            }
            mask[usize::from(n) / 64] |= 1 << (n % 64);
        }
        Ok(mask)
    }

    /// The `maxnode` argument for a mask of `mask_bits()` bits: the kernel reads
    /// `maxnode - 1` bits.
    fn maxnode(&self) -> u64 {
        self.mask_bits() as u64 + 1
    }

    /// The mode, node mask and `maxnode` arguments `mbind`/`set_mempolicy` take for `policy`.
    fn policy_args(&self, policy: &MemPolicy) -> Result<PolicyArgs, NumaError> {
        let (mode, nodes) = policy.mode_and_nodes();
        let mask = self.mask_of(&nodes)?;
        let maxnode = if nodes.is_empty() { 0 } else { self.maxnode() };
        Ok(PolicyArgs {
            mode,
            nodes,
            mask,
            maxnode,
        })
    }
}

/// A policy as the kernel's calls take it (see [`HostNuma::policy_args`]).
struct PolicyArgs {
    mode: i32,
    nodes: Vec<u16>,
    mask: Vec<u64>,
    /// 0 (with a null mask) when the policy names no nodes.
    maxnode: u64,
}

impl PolicyArgs {
    /// The mask pointer: null when the policy names no nodes.
    fn mask_ptr(&self) -> *const u64 {
        if self.nodes.is_empty() {
            std::ptr::null()
        } else {
            self.mask.as_ptr()
        }
    }
}

/// A memory policy, as `mbind`/`set_mempolicy` take it and `get_mempolicy` gives it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemPolicy {
    /// No policy of its own: the thread's (or the system default, local allocation).
    Default,
    /// Allocate on the first node with free memory, fall back to others.
    Preferred(NodeId),
    /// Allocate only on these nodes.
    Bind(Vec<NodeId>),
    /// Spread pages over these nodes.
    Interleave(Vec<NodeId>),
    /// Allocate on the node of the CPU that faults.
    Local,
}

impl MemPolicy {
    fn mode_and_nodes(&self) -> (i32, Vec<u16>) {
        let ids = |v: &[NodeId]| v.iter().map(|n| n.0).collect::<Vec<_>>();
        match self {
            MemPolicy::Default => (MPOL_DEFAULT, Vec::new()),
            MemPolicy::Preferred(n) => (MPOL_PREFERRED, vec![n.0]),
            MemPolicy::Bind(v) => (MPOL_BIND, ids(v)),
            MemPolicy::Interleave(v) => (MPOL_INTERLEAVE, ids(v)),
            MemPolicy::Local => (MPOL_LOCAL, Vec::new()),
        }
    }

    fn from_mode(mode: i32, mask: &[u64]) -> Result<MemPolicy, NumaError> {
        // Mode flags (MPOL_F_STATIC_NODES and friends) sit in the high bits.
        let mode = mode & 0xff;
        let nodes: Vec<NodeId> = (0..mask.len() * 64)
            .filter(|&i| mask[i / 64] & (1 << (i % 64)) != 0)
            .filter_map(|i| u16::try_from(i).ok().map(NodeId))
            .collect();
        Ok(match mode {
            MPOL_DEFAULT => MemPolicy::Default,
            MPOL_PREFERRED => match nodes.first() {
                Some(n) => MemPolicy::Preferred(*n),
                // An empty preferred mask is "local" in the kernel's older spelling.
                None => MemPolicy::Local,
            },
            MPOL_BIND => MemPolicy::Bind(nodes),
            MPOL_INTERLEAVE => MemPolicy::Interleave(nodes),
            MPOL_LOCAL => MemPolicy::Local,
            other => return Err(NumaError::UnknownMode(other)),
        })
    }
}

fn check_range(addr: usize, len: usize) -> Result<(), NumaError> {
    if len == 0 || addr % PAGE != 0 || len % PAGE != 0 || addr.checked_add(len).is_none() {
        return Err(NumaError::Unaligned { addr, len });
    }
    Ok(())
}

/// Set `policy` on `[addr, addr+len)` (page aligned, inside a mapping of this process).
/// `move_existing` also migrates the pages already in the range that do not satisfy it, and
/// fails with [`NumaError::NotMoved`] when some could not be moved (the policy is set anyway).
///
/// The call changes where the kernel allocates future pages of the range (and with
/// `move_existing`, where existing ones live); it never changes their content.
pub fn set_range_policy(
    addr: usize,
    len: usize,
    policy: &MemPolicy,
    move_existing: bool,
) -> Result<(), NumaError> {
    check_range(addr, len)?;
    let args = HostNuma::get().policy_args(policy)?;
    let flags = if move_existing {
        MPOL_MF_MOVE | MPOL_MF_STRICT
    } else {
        0
    };
    // SAFETY: mbind reads `maxnode - 1` bits from `mask`, which holds `mask_bits()` bits (or
    // nothing when the pointer is null and maxnode 0). It changes the policy (and, with
    // MPOL_MF_MOVE, the physical placement) of pages in the caller's range, never their
    // content, so no Rust object is affected.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as libc::c_ulong,
            len as libc::c_ulong,
            args.mode as libc::c_ulong,
            args.mask_ptr(),
            args.maxnode as libc::c_ulong,
            flags as libc::c_ulong,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if move_existing && e.raw_os_error() == Some(libc::EIO) {
            let node = args.nodes.first().copied().unwrap_or(0);
            return Err(NumaError::NotMoved { addr, len, node });
        }
        return Err(NumaError::Syscall {
            call: "mbind",
            source: e,
        });
    }
    Ok(())
}

/// Bind `[addr, addr+len)` to host `node` (`MPOL_BIND`): pages faulted in from now on come
/// from that node only. With `move_existing`, the pages already present are migrated there
/// too (`MPOL_MF_MOVE | MPOL_MF_STRICT`; [`NumaError::NotMoved`] if some could not be).
pub fn bind_range(
    addr: usize,
    len: usize,
    node: NodeId,
    move_existing: bool,
) -> Result<(), NumaError> {
    set_range_policy(addr, len, &MemPolicy::Bind(vec![node]), move_existing)
}

/// Drop the range's own policy (`MPOL_DEFAULT`), so it allocates like the rest of the process
/// (and an anonymous range can merge with its neighbours' mapping again).
pub fn reset_range(addr: usize, len: usize) -> Result<(), NumaError> {
    set_range_policy(addr, len, &MemPolicy::Default, false)
}

/// The policy in force at `addr` (`get_mempolicy(MPOL_F_ADDR)`): the mapping's (or file's
/// shared) policy, [`MemPolicy::Default`] when it has none.
pub fn range_policy(addr: usize) -> Result<MemPolicy, NumaError> {
    let host = HostNuma::get();
    let mut mask = host.mask_of(&[])?;
    let mut mode: libc::c_int = 0;
    // SAFETY: get_mempolicy writes one int to `mode` and `maxnode - 1` bits (rounded up to
    // whole words, i.e. `mask_bits()` bits) to `mask`, both owned and large enough; it only
    // reads the policy of the mapping at `addr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            host.maxnode() as libc::c_ulong,
            addr as libc::c_ulong,
            MPOL_F_ADDR as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(last_os("get_mempolicy(MPOL_F_ADDR)"));
    }
    MemPolicy::from_mode(mode, &mask)
}

/// Where one page is, as [`nodes_of_pages`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageNode {
    /// The page is present on this node.
    On(NodeId),
    /// No page is present at the address (never touched, discarded, or the shared zero page).
    Absent,
    /// The kernel reported another condition for the page (a negative errno).
    Other(i32),
}

/// The node of the page behind each address (4 KiB aligned, this process), without faulting
/// any page in: `move_pages(2)` with no target nodes only reports.
pub fn nodes_of_pages(addrs: &[usize]) -> Result<Vec<PageNode>, NumaError> {
    if addrs.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(&a) = addrs.iter().find(|&&a| a % PAGE != 0) {
        return Err(NumaError::Unaligned { addr: a, len: PAGE });
    }
    let pages: Vec<*mut libc::c_void> = addrs.iter().map(|&a| a as *mut libc::c_void).collect();
    let mut status = vec![0 as libc::c_int; addrs.len()];
    // SAFETY: pid 0 is this process; `pages` and `status` hold `addrs.len()` entries each, and
    // with a null `nodes` array move_pages only writes each page's node (or -errno) to
    // `status`. Nothing is moved or faulted in.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::c_int,
            addrs.len() as libc::c_ulong,
            pages.as_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0 as libc::c_int,
        )
    };
    if rc != 0 {
        return Err(last_os("move_pages(query)"));
    }
    Ok(status
        .into_iter()
        .map(|s| match s {
            s if s >= 0 => u16::try_from(s).map_or(PageNode::Other(s), |n| PageNode::On(NodeId(n))),
            s if s == -libc::ENOENT || s == -libc::EFAULT => PageNode::Absent,
            s => PageNode::Other(s),
        })
        .collect())
}

/// The node of the page at `addr` (4 KiB aligned), `None` when no page is present there.
pub fn node_of_page(addr: usize) -> Result<Option<NodeId>, NumaError> {
    Ok(match nodes_of_pages(&[addr])?.first() {
        Some(PageNode::On(n)) => Some(*n),
        _ => None,
    })
}

/// Sets the calling thread's memory policy for its lifetime and puts the previous one back
/// when dropped. For allocations that no mapping's policy governs (`fallocate` on a hugetlbfs
/// file uses the thread's policy). Keep it on one thread: it is `!Send`.
#[derive(Debug)]
pub struct ThreadPolicy {
    previous: MemPolicy,
    _not_send: std::marker::PhantomData<*const ()>,
}

fn set_thread_policy(policy: &MemPolicy) -> Result<(), NumaError> {
    let args = HostNuma::get().policy_args(policy)?;
    // SAFETY: set_mempolicy reads `maxnode - 1` bits from `mask` (or nothing with a null
    // pointer and maxnode 0); it only changes where this thread's future allocations go.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_set_mempolicy,
            args.mode as libc::c_ulong,
            args.mask_ptr(),
            args.maxnode as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(last_os("set_mempolicy"));
    }
    Ok(())
}

/// The calling thread's policy (`get_mempolicy` without flags).
pub fn thread_policy() -> Result<MemPolicy, NumaError> {
    let host = HostNuma::get();
    let mut mask = host.mask_of(&[])?;
    let mut mode: libc::c_int = 0;
    // SAFETY: as in `range_policy`, into buffers owned here; only reads the thread's policy.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            host.maxnode() as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(last_os("get_mempolicy"));
    }
    MemPolicy::from_mode(mode, &mask)
}

impl ThreadPolicy {
    /// Make the calling thread allocate under `policy` until the guard is dropped.
    pub fn set(policy: &MemPolicy) -> Result<ThreadPolicy, NumaError> {
        let previous = thread_policy()?;
        set_thread_policy(policy)?;
        Ok(ThreadPolicy {
            previous,
            _not_send: std::marker::PhantomData,
        })
    }
}

impl Drop for ThreadPolicy {
    fn drop(&mut self) {
        if let Err(e) = set_thread_policy(&self.previous) {
            tracing::warn!(error = %e, "restoring the thread's memory policy failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private anonymous mapping for a test, unmapped on drop.
    struct Map {
        addr: usize,
        len: usize,
    }

    impl Map {
        fn new(len: usize) -> Map {
            // SAFETY: a fresh anonymous mapping at an address the kernel picks.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Map {
                addr: p as usize,
                len,
            }
        }

        fn touch(&self) {
            for off in (0..self.len).step_by(PAGE) {
                // SAFETY: inside the read-write mapping this test owns.
                unsafe { ((self.addr + off) as *mut u8).write_volatile(0x5a) };
            }
        }

        fn pages(&self) -> Vec<usize> {
            (0..self.len).step_by(PAGE).map(|o| self.addr + o).collect()
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`, not used after this.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }

    #[test]
    fn node_lists_parse() {
        assert_eq!(parse_node_list("0\n").unwrap(), vec![0]);
        assert_eq!(parse_node_list("0-3").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_node_list("0,2-3").unwrap(), vec![0, 2, 3]);
        assert!(parse_node_list("3-1").is_err());
        assert!(parse_node_list("x").is_err());
    }

    #[test]
    fn masks_are_sized_from_the_highest_node() {
        let h = HostNuma::new(1, vec![0, 1]);
        assert_eq!(h.mask_bits(), 64);
        assert_eq!(h.maxnode(), 65);
        assert_eq!(h.mask_of(&[0, 1]).unwrap(), vec![0b11]);
        assert!(matches!(
            h.mask_of(&[2]),
            Err(NumaError::NoSuchNode { node: 2, max: 1 })
        ));
        let big = HostNuma::new(64, vec![0, 64]);
        assert_eq!(big.mask_bits(), 128);
        assert_eq!(big.mask_of(&[64]).unwrap(), vec![0, 1]);
        assert!(h.is_multi_node());
        assert!(!HostNuma::new(0, vec![0]).is_multi_node());
    }

    #[test]
    fn host_topology_reads() {
        let h = HostNuma::read().expect("sysfs node list");
        assert!(h.online().contains(&0), "node 0 is online: {h:?}");
        assert!(h.online().iter().all(|&n| n <= h.max_node()));
    }

    #[test]
    fn bind_touch_and_query_on_node_0() {
        let m = Map::new(4 << 20);
        bind_range(m.addr, m.len, NodeId(0), false).expect("mbind node 0");
        assert_eq!(
            range_policy(m.addr + PAGE).unwrap(),
            MemPolicy::Bind(vec![NodeId(0)])
        );
        // Nothing touched yet: no page to report.
        assert_eq!(node_of_page(m.addr).unwrap(), None);
        m.touch();
        let nodes = nodes_of_pages(&m.pages()).unwrap();
        assert_eq!(nodes.len(), 1024);
        assert!(
            nodes.iter().all(|n| *n == PageNode::On(NodeId(0))),
            "{:?}",
            nodes.iter().find(|n| **n != PageNode::On(NodeId(0)))
        );
        // Moving pages that are already on the node succeeds.
        bind_range(m.addr, m.len, NodeId(0), true).expect("mbind with move");
        reset_range(m.addr, m.len).unwrap();
        assert_eq!(range_policy(m.addr).unwrap(), MemPolicy::Default);
        // Content is untouched by policy changes.
        // SAFETY: inside the mapping, written above.
        assert_eq!(unsafe { (m.addr as *const u8).read_volatile() }, 0x5a);
    }

    #[test]
    fn preferred_and_interleave_round_trip() {
        let m = Map::new(2 << 20);
        set_range_policy(m.addr, m.len, &MemPolicy::Preferred(NodeId(0)), false).unwrap();
        assert_eq!(
            range_policy(m.addr).unwrap(),
            MemPolicy::Preferred(NodeId(0))
        );
        set_range_policy(
            m.addr,
            m.len,
            &MemPolicy::Interleave(vec![NodeId(0)]),
            false,
        )
        .unwrap();
        assert_eq!(
            range_policy(m.addr).unwrap(),
            MemPolicy::Interleave(vec![NodeId(0)])
        );
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let m = Map::new(2 << 20);
        let max = HostNuma::get().max_node();
        assert!(matches!(
            bind_range(m.addr, m.len, NodeId(max + 1), false),
            Err(NumaError::NoSuchNode { .. })
        ));
        assert!(matches!(
            bind_range(m.addr + 1, PAGE, NodeId(0), false),
            Err(NumaError::Unaligned { .. })
        ));
        assert!(matches!(
            bind_range(m.addr, 0, NodeId(0), false),
            Err(NumaError::Unaligned { .. })
        ));
        assert!(matches!(
            nodes_of_pages(&[m.addr + 8]),
            Err(NumaError::Unaligned { .. })
        ));
        // An address with no mapping is refused by the kernel (EFAULT), not a crash.
        assert!(matches!(
            bind_range(PAGE, PAGE, NodeId(0), false),
            Err(NumaError::Syscall { call: "mbind", .. })
        ));
    }

    #[test]
    fn thread_policy_is_scoped() {
        std::thread::spawn(|| {
            assert_eq!(thread_policy().unwrap(), MemPolicy::Default);
            {
                let _g = ThreadPolicy::set(&MemPolicy::Bind(vec![NodeId(0)])).unwrap();
                assert_eq!(thread_policy().unwrap(), MemPolicy::Bind(vec![NodeId(0)]));
                let m = Map::new(1 << 20);
                m.touch();
                assert!(nodes_of_pages(&m.pages())
                    .unwrap()
                    .iter()
                    .all(|n| *n == PageNode::On(NodeId(0))));
            }
            assert_eq!(thread_policy().unwrap(), MemPolicy::Default);
        })
        .join()
        .unwrap();
    }
}
