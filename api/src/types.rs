//! Request and response bodies of the REST API. Sizes are in MiB and say so in their field names.
//!
//! Every request type rejects unknown fields; validation lives in [`crate::validate`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

fn default_vcpus() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_block_mib() -> u64 {
    2
}
fn is_true(v: &bool) -> bool {
    *v
}

/// Host memory figures for one NUMA node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    /// NUMA node id.
    pub node: u32,
    /// Memory of this node managed by Tidepool's pool.
    pub total_mib: u64,
    /// Free memory in the pool on this node.
    pub free_mib: u64,
    /// Guest RAM assigned to VMs on this node (what the VMs could touch).
    pub assigned_mib: u64,
    /// Resident memory on this node, by migration type.
    pub resident_mib: ResidentByType,
    /// Fragmentation index for 2 MiB (order 9) allocations: 0 = none, 1 = fully fragmented.
    pub fragmentation_index: f64,
    /// Share of resident guest memory backed by transparent huge pages (0..=1).
    pub thp_share: f64,
    /// Assigned guest RAM divided by `total_mib`.
    pub overcommit_ratio: f64,
}

/// Resident memory split by migration type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResidentByType {
    /// Unmovable allocations (VMM metadata, page tables).
    pub unmovable_mib: u64,
    /// Movable allocations (guest RAM).
    pub movable_mib: u64,
    /// Reclaimable allocations (caches).
    pub reclaimable_mib: u64,
}

/// `GET /v1/host`: host memory, per node and in total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    /// Per-node figures.
    pub nodes: Vec<NodeInfo>,
    /// Sum of `total_mib` over nodes.
    pub total_mib: u64,
    /// Sum of `free_mib` over nodes.
    pub free_mib: u64,
    /// Sum of `assigned_mib` over nodes.
    pub assigned_mib: u64,
    /// Host-wide assigned guest RAM divided by total pool memory.
    pub overcommit_ratio: f64,
    /// Number of VMs the daemon manages.
    pub vm_count: u32,
}

/// A raw "tiny guest" image: flat bytes loaded at `load_addr`, entered at `entry` (64-bit mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RawImage {
    /// Path of the image file on the host (exclusive with `inline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The image bytes inline, as an array of numbers 0..=255 (exclusive with `path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<Vec<u8>>,
    /// Guest physical address the image is loaded at.
    pub load_addr: u64,
    /// Guest physical address of the first instruction.
    pub entry: u64,
    /// Privilege level the image is entered at. Default `kernel` (CPL0), which every image
    /// can run at; `user` (CPL3) suits images built for it (`tidepool tiny-image` says which)
    /// and runs natively on hosts whose nested KVM emulates CPL0 code.
    #[serde(default)]
    pub privilege: ImagePrivilege,
}

/// Privilege level a raw image starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImagePrivilege {
    /// CPL0: the image may use privileged instructions (`hlt`, control registers).
    #[default]
    Kernel,
    /// CPL3: no privileged instructions (one faults the VM); port I/O is allowed (IOPL 3).
    User,
}

/// virtio-mem hotplug region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HotplugConfig {
    /// Size of the hot-pluggable region (multiple of 128 MiB).
    pub region_mib: u64,
    /// virtio-mem block size (power of two, at least 2 MiB). Default 2.
    #[serde(default = "default_block_mib")]
    pub block_mib: u64,
    /// How the region's KVM memslots are managed. Default `eager`.
    #[serde(default)]
    pub memslots: MemslotStrategy,
}

/// KVM memslot strategy of a hotplug region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemslotStrategy {
    /// All of the region's 128 MiB slots are registered at VM creation over inaccessible
    /// memory; plug and unplug change only protection and discard (fastest unplug; KVM keeps
    /// per-slot arrays for the whole region).
    #[default]
    Eager,
    /// A slot is registered when its first block is plugged and deleted when its last block
    /// is unplugged (fewest live slots; an unplug that empties a slot costs a slot deletion).
    Lazy,
}

/// virtio-balloon device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Offer free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Offer DEFLATE_ON_OOM.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Statistics polling interval in seconds; 0 disables the stats queue.
    #[serde(default)]
    pub stats_interval_s: u32,
    /// Offer free page hinting (host-started passes; hints discarded only with a swap).
    #[serde(default)]
    pub free_page_hinting: bool,
}

/// NUMA placement policy of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NumaPolicy {
    /// Allocate on the node of the allocating thread (no `nodes`).
    Local,
    /// Prefer one node (exactly one entry in `nodes`).
    Preferred,
    /// Interleave over `nodes`.
    Interleave,
    /// Only use `nodes`.
    Bind,
}

/// NUMA configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NumaConfig {
    /// The policy.
    pub policy: NumaPolicy,
    /// Host nodes the policy refers to.
    #[serde(default)]
    pub nodes: Vec<u32>,
}

/// What guest RAM is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackingKind {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// A memfd (shareable).
    Memfd,
    /// hugetlbfs pages (must be reserved on the host).
    Hugetlbfs,
}

/// Backing of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackingConfig {
    /// Kind of backing. Default `anonymous`.
    #[serde(default)]
    pub kind: BackingKind,
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`). Default true; not allowed with hugetlbfs.
    #[serde(default = "default_true")]
    pub thp: bool,
}

impl Default for BackingConfig {
    fn default() -> Self {
        BackingConfig {
            kind: BackingKind::Anonymous,
            thp: true,
        }
    }
}

/// `POST /v1/vms`: create (and by default start) a VM.
///
/// Boot source: `image` (a raw tiny guest) or `kernel` (+ `initrd`, `cmdline`); with neither,
/// the built-in default guest is booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// Number of vCPUs. Default 1.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Boot RAM (multiple of 2 MiB).
    pub memory_mib: u64,
    /// Path of a kernel (vmlinux or bzImage) on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Path of an initramfs on the host (needs `kernel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line (needs `kernel`; the default guest has its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// A raw tiny-guest image instead of a kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<RawImage>,
    /// virtio-mem hotplug region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug: Option<HotplugConfig>,
    /// virtio-balloon device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// NUMA placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<NumaConfig>,
    /// Backing of guest RAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<BackingConfig>,
    /// Start the VM right away. Default true.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub start: bool,
}

impl CreateVmRequest {
    /// A request with `memory_mib` and every other field at its default.
    pub fn with_memory(memory_mib: u64) -> Self {
        CreateVmRequest {
            vcpus: 1,
            memory_mib,
            kernel: None,
            initrd: None,
            cmdline: None,
            image: None,
            hotplug: None,
            balloon: None,
            numa: None,
            backing: None,
            start: true,
        }
    }
}

/// Lifecycle state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Created with `start: false`, not yet running.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// Stopped (terminal; delete it).
    Stopped,
}

impl VmState {
    /// The lower-case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
        }
    }
}

/// Where a VM boots from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BootSource {
    /// The built-in default guest.
    DefaultGuest,
    /// A kernel given by path.
    Kernel,
    /// A raw tiny-guest image.
    RawImage,
}

/// A VM as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    /// VM id (`[A-Za-z0-9_-]`, at most 64 characters).
    pub id: String,
    /// Lifecycle state.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Boot RAM.
    pub memory_mib: u64,
    /// Boot source.
    pub boot_source: BootSource,
    /// Kernel path, when booted from a kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Hotplug region, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug: Option<HotplugConfig>,
    /// Balloon device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// NUMA placement, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<NumaConfig>,
    /// Backing of guest RAM.
    pub backing: BackingConfig,
    /// Why a stopped VM stopped when that was not a request (the guest finished, or it
    /// failed: a crash, or guest memory that could not be read back from swap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
}

/// Lifecycle action for `PUT /v1/vms/{id}/state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StateAction {
    /// created -> running.
    Start,
    /// running -> paused.
    Pause,
    /// paused -> running.
    Resume,
    /// created|running|paused -> stopped.
    Stop,
}

impl StateAction {
    /// The state this action leads to from `from`, or `None` when the transition is forbidden.
    /// Backends use this so that every implementation enforces the same rules.
    pub fn apply(self, from: VmState) -> Option<VmState> {
        match (self, from) {
            (StateAction::Start, VmState::Created) => Some(VmState::Running),
            (StateAction::Pause, VmState::Running) => Some(VmState::Paused),
            (StateAction::Resume, VmState::Paused) => Some(VmState::Running),
            (StateAction::Stop, VmState::Created | VmState::Running | VmState::Paused) => {
                Some(VmState::Stopped)
            }
            _ => None,
        }
    }

    /// The lower-case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            StateAction::Start => "start",
            StateAction::Pause => "pause",
            StateAction::Resume => "resume",
            StateAction::Stop => "stop",
        }
    }
}

/// Body of `PUT /v1/vms/{id}/state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StateRequest {
    /// The action.
    pub action: StateAction,
}

/// Body of `PUT /v1/vms/{id}/memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    /// Requested total guest RAM (boot RAM plus hot-plugged memory).
    pub requested_mib: u64,
}

/// Phase of the current or last memory resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResizePhase {
    /// Nothing to do: plugged equals requested.
    Idle,
    /// The guest is plugging memory.
    Plugging,
    /// The guest is unplugging memory.
    Unplugging,
    /// The resize failed; see `error`.
    Failed,
}

/// Progress of a memory resize.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeStatus {
    /// Phase.
    pub phase: ResizePhase,
    /// Total plugged RAM when the current resize began.
    pub from_mib: u64,
    /// Whether the guest's virtio-mem driver is up (resizes are refused before).
    pub driver_ready: bool,
    /// Why the last resize failed or stalls, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/vms/{id}/memory`: guest memory figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryInfo {
    /// Boot RAM.
    pub boot_mib: u64,
    /// Hotplug region size (0 without virtio-mem).
    pub region_mib: u64,
    /// Total RAM plugged now (boot RAM plus hot-plugged blocks).
    pub plugged_mib: u64,
    /// Total RAM requested (boot RAM plus requested hot-plugged memory).
    pub requested_mib: u64,
    /// Host memory resident for this guest.
    pub resident_mib: u64,
    /// Memory the guest reported free (free page reporting) and the host discarded.
    pub reported_mib: u64,
    /// Memory held by the balloon.
    pub ballooned_mib: u64,
    /// Discarded memory the guest touched again (swap-ins included).
    pub refaulted_mib: u64,
    /// Memory swapped out now (its content only in the daemon's swap file).
    #[serde(default)]
    pub swapped_mib: u64,
    /// Resize progress.
    pub resize: ResizeStatus,
}

/// Body of `PUT /v1/vms/{id}/balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BalloonRequest {
    /// Target balloon size (memory taken away from the guest).
    pub target_mib: u64,
}

/// Balloon target and actual size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BalloonInfo {
    /// Target size.
    pub target_mib: u64,
    /// Size the guest has inflated to.
    pub actual_mib: u64,
}

/// `GET /v1/vms/{id}/balloon/stats`: balloon size and the guest's last statistics (the
/// virtio-balloon stats queue). Statistics are absent until the guest sends them, and each
/// is absent when the guest did not send its tag (older kernels send fewer). Units follow
/// what Linux sends: swap, scan and reclaim amounts are bytes (cumulative since the guest
/// booted), memory sizes are converted to MiB (rounded down), counts are plain counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BalloonStats {
    /// Target size.
    pub target_mib: u64,
    /// Size the guest has inflated to.
    pub actual_mib: u64,
    /// When the guest's last statistics arrived, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_unix_ms: Option<u64>,
    /// Memory swapped in, in bytes (tag 0, SWAP_IN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in_bytes: Option<u64>,
    /// Memory swapped out, in bytes (tag 1, SWAP_OUT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out_bytes: Option<u64>,
    /// Major page faults (tag 2, MAJFLT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults (tag 3, MINFLT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Free memory in the guest (tag 4, MEMFREE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_mib: Option<u64>,
    /// Total memory the guest sees (tag 5, MEMTOT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_mib: Option<u64>,
    /// Available memory in the guest (tag 6, AVAIL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_mib: Option<u64>,
    /// Page cache (tag 7, CACHES).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches_mib: Option<u64>,
    /// Successful hugetlb allocations (tag 8, HTLB_PGALLOC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb allocations (tag 9, HTLB_PGFAIL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations (tag 10, OOM_KILL; Linux 6.10+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
    /// Allocation stalls (tag 11, ALLOC_STALL; Linux 6.10+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stalls: Option<u64>,
    /// Memory scanned by background reclaim (kswapd), in bytes (tag 12, ASYNC_SCAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan_bytes: Option<u64>,
    /// Memory scanned by direct reclaim, in bytes (tag 13, DIRECT_SCAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan_bytes: Option<u64>,
    /// Memory reclaimed by background reclaim, in bytes (tag 14, ASYNC_RECLAIM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim_bytes: Option<u64>,
    /// Memory reclaimed by direct reclaim, in bytes (tag 15, DIRECT_RECLAIM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim_bytes: Option<u64>,
    /// Entries with tags this daemon does not know in the last update (ignored, counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_tags: Option<u64>,
}

impl BalloonStats {
    /// Stats with only the sizes known.
    pub fn sizes_only(target_mib: u64, actual_mib: u64) -> Self {
        BalloonStats {
            target_mib,
            actual_mib,
            updated_unix_ms: None,
            swap_in_bytes: None,
            swap_out_bytes: None,
            major_faults: None,
            minor_faults: None,
            free_mib: None,
            total_mib: None,
            available_mib: None,
            disk_caches_mib: None,
            hugetlb_allocations: None,
            hugetlb_failures: None,
            oom_kills: None,
            alloc_stalls: None,
            async_scan_bytes: None,
            direct_scan_bytes: None,
            async_reclaim_bytes: None,
            direct_reclaim_bytes: None,
            unknown_tags: None,
        }
    }
}
