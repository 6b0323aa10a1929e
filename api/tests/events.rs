//! Lifecycle, resize and balloon calls emit tracing events carrying the VM id.

mod common;

use common::{create, hotplug_vm, Harness};
use std::io::Write;
use std::sync::{Arc, Mutex};
use tidepool_api::types::StateAction;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_name_the_vm() {
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        panic!("this test binary must own the global subscriber");
    }
    let h = Harness::start().await;
    let vm = create(&h, &hotplug_vm()).await;
    let id = vm.id.clone();
    let ok = |r: bool| assert!(r);
    ok(h.unix.set_state(&id, StateAction::Pause).await.is_ok());
    ok(h.unix.set_state(&id, StateAction::Pause).await.is_err());
    ok(h.unix.set_state(&id, StateAction::Resume).await.is_ok());
    ok(h.unix.resize_memory(&id, 1024).await.is_ok());
    ok(h.unix.resize_memory(&id, 8).await.is_err());
    ok(h.unix.set_balloon(&id, 64).await.is_ok());
    ok(h.unix.delete_vm(&id).await.is_ok());
    h.stop().await;
    let text =
        String::from_utf8_lossy(&buf.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let vm_field = format!("vm_id={id}");
    for event in [
        "vm created",
        "vm state changed",
        "vm state change refused",
        "resize accepted",
        "resize refused",
        "balloon target set",
        "vm deleted",
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains(event) && l.contains(&vm_field)),
            "no {event:?} event with {vm_field} in:\n{text}"
        );
    }
}
