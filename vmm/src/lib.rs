//! Tidepool VMM: KVM, vCPUs, boot, virtio-mmio transport and VM lifecycle.

pub mod bench;
pub mod devices;
pub mod hostpool;
pub mod kvm;
pub mod manager;
pub mod memory;
pub mod microvm;
pub mod tiny_guest;
