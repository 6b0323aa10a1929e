//! Free page reporting through the balloon versus raw madvise, on this host.
//!
//! `cargo run --release -p tidepool-balloon --features bench --example reclaim_bench -- [MiB] [thp|4k] [block KiB]`
//! (`4k`: no transparent huge pages; block size defaults to 2048 KiB, Linux's order 9).

use tidepool_balloon::bench::{ReclaimBench, ReclaimBenchConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let huge = args.next().as_deref() != Some("4k");
    let block_kib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2048);
    let cfg = ReclaimBenchConfig {
        data_bytes: mib << 20,
        block_bytes: block_kib << 10,
        huge_pages: huge,
        ..Default::default()
    };
    match ReclaimBench::compare(cfg) {
        Ok(f) => {
            println!(
                "data {mib} MiB, blocks {block_kib} KiB, THP {huge}, host 2 MiB aligned {}",
                f.host_huge_aligned
            );
            println!("populate        {:>8.3} s", f.populate.as_secs_f64());
            println!(
                "reporting       {:>8.2} GiB/s ({} reports, {} resident after)",
                f.reporting.gib_per_s(),
                f.reporting.operations,
                f.reporting.resident_after
            );
            println!(
                "raw madvise     {:>8.2} GiB/s ({} calls, {} resident after)",
                f.raw.gib_per_s(),
                f.raw.operations,
                f.raw.resident_after
            );
            println!(
                "device overhead {:>8.1} us/GiB (reporting time outside madvise; {:.2} ms in madvise)",
                f.reporting.overhead_us_per_gib(),
                f.reporting.in_discard.as_secs_f64() * 1e3
            );
            println!(
                "ratio           {:>8.3}",
                f.reporting.gib_per_s() / f.raw.gib_per_s()
            );
        }
        Err(e) => {
            eprintln!("reclaim bench failed: {e}");
            std::process::exit(1);
        }
    }
}
