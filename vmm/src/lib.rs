//! Tidepool VMM: KVM, vCPUs, boot, virtio-mmio transport and VM lifecycle.

pub mod acpi;
pub mod bench;
pub mod boot;
pub mod devices;
pub mod hostpool;
pub mod kvm;
pub mod latency;
pub mod legacy;
pub mod manager;
pub mod memory;
pub mod microvm;
pub mod reclaim;
pub mod swap;
pub mod tiny_guest;
pub mod up;
