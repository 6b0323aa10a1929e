//! Unit tests of the CLI's pure parts: size/address/NUMA parsing, clap definitions and the
//! conversion of `vm create` options into a request.

use super::args::{parse_addr, parse_numa};
use super::*;
use crate::types::{BackingKind, ImagePrivilege, NumaPolicy};
use clap::Parser;

#[test]
fn sizes() {
    for (s, v) in [
        ("512", 512),
        ("512M", 512),
        ("512mib", 512),
        ("512 MiB", 512),
        ("2G", 2048),
        ("2GiB", 2048),
        ("2gb", 2048),
        ("1T", 1 << 20),
        ("2048K", 2),
        (" 64 ", 64),
    ] {
        assert_eq!(parse_size_mib(s).ok(), Some(v), "{s}");
    }
    for s in [
        "",
        "M",
        "1.5G",
        "-1",
        "12X",
        "1000K",
        "99999999999999999999",
        "18014398509481984G",
    ] {
        assert!(parse_size_mib(s).is_err(), "{s}");
    }
}

#[test]
fn addresses_and_numa() {
    assert_eq!(parse_addr("0x1000").ok(), Some(0x1000));
    assert_eq!(parse_addr("4096").ok(), Some(4096));
    assert_eq!(parse_addr("0x10_0000").ok(), Some(0x10_0000));
    assert!(parse_addr("0xzz").is_err());
    assert!(parse_addr("").is_err());
    let n = parse_numa("bind:0,1").ok();
    assert_eq!(n.as_ref().map(|n| n.policy), Some(NumaPolicy::Bind));
    assert_eq!(n.map(|n| n.nodes), Some(vec![0, 1]));
    assert_eq!(parse_numa("local").map(|n| n.nodes.len()).ok(), Some(0));
    assert!(parse_numa("preferred:x").is_err());
    assert!(parse_numa("random").is_err());
}

fn parse(args: &[&str]) -> Result<ApiCli, clap::Error> {
    ApiCli::try_parse_from(std::iter::once("tidepool").chain(args.iter().copied()))
}

#[test]
fn clap_definitions_are_consistent() {
    use clap::CommandFactory;
    ApiCli::command().debug_assert();
}

#[test]
fn parses_commands() {
    let cli = parse(&["vm", "resize", "vm-1", "2G", "--timeout", "5"]).ok();
    assert_eq!(
        cli.map(|c| c.command),
        Some(ApiCommand::Vm(VmCommand::Resize {
            id: "vm-1".into(),
            size: "2G".into(),
            timeout: 5,
            no_wait: false,
        }))
    );
    let cli = parse(&["--json", "balloon", "set", "vm-2", "256M"]).ok();
    assert_eq!(cli.as_ref().map(|c| c.connect.json), Some(true));
    let cli = parse(&["host", "--socket", "/tmp/x.sock"]).ok();
    assert_eq!(
        cli.map(|c| c.connect.socket),
        Some(std::path::PathBuf::from("/tmp/x.sock"))
    );
    assert!(parse(&["vm", "create"]).is_err(), "--memory required");
    assert!(parse(&["vm", "create", "--memory", "1G", "--initrd", "/i"]).is_err());
    assert!(parse(&["vm", "create", "--memory", "1G", "--image", "/x"]).is_err());
    assert!(
        parse(&["--tcp", "127.0.0.1:9000", "host"]).is_err(),
        "needs a token file"
    );
    assert!(parse(&["vm", "resize", "vm-1"]).is_err());
}

fn create_args(args: &[&str]) -> CreateArgs {
    let mut v = vec!["vm", "create"];
    v.extend_from_slice(args);
    match parse(&v).map(|c| c.command) {
        Ok(ApiCommand::Vm(VmCommand::Create(a))) => *a,
        other => panic!("{other:?}"),
    }
}

/// `--free-page-hinting` alone adds a balloon that offers hinting and nothing else.
#[test]
fn free_page_hinting_implies_a_balloon() {
    let r = create_args(&["--memory", "512", "--free-page-hinting"])
        .to_request()
        .unwrap_or_else(|e| panic!("{e}"));
    let b = r.balloon.expect("a balloon");
    assert!(b.free_page_hinting);
    assert!(!b.free_page_reporting && !b.deflate_on_oom && b.stats_interval_s == 0);
    assert!(crate::validate::create_vm(&r).is_ok());
    let r = create_args(&["--memory", "512"])
        .to_request()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.balloon.is_none());
}

#[test]
fn create_options_become_a_request() {
    let a = create_args(&[
        "--memory",
        "1G",
        "--vcpus",
        "2",
        "--hotplug",
        "2G",
        "--free-page-reporting",
        "--stats-interval",
        "5",
        "--numa",
        "interleave:0,1",
        "--backing",
        "memfd",
        "--no-start",
    ]);
    let r = a.to_request().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.memory_mib, 1024);
    assert_eq!(r.vcpus, 2);
    assert_eq!(
        r.hotplug.map(|h| (h.region_mib, h.block_mib)),
        Some((2048, 2))
    );
    let b = r.balloon.unwrap_or_default();
    assert!(b.free_page_reporting && !b.deflate_on_oom && b.stats_interval_s == 5);
    assert!(!b.free_page_hinting);
    assert_eq!(r.numa.as_ref().map(|n| n.nodes.clone()), Some(vec![0, 1]));
    assert_eq!(
        r.backing.map(|b| (b.kind, b.thp)),
        Some((BackingKind::Memfd, true))
    );
    assert!(!r.start);
    assert!(crate::validate::create_vm(&r).is_ok());

    // A raw image, then the same with `--privilege user`.
    let image_args = [
        "--memory",
        "256",
        "--image",
        "img.bin",
        "--load-addr",
        "0x10000",
        "--entry",
        "0x10010",
    ];
    let r = create_args(&image_args)
        .to_request()
        .unwrap_or_else(|e| panic!("{e}"));
    let img = r.image.unwrap_or_else(|| panic!("no image"));
    assert!(img
        .path
        .is_some_and(|p| p.starts_with('/') && p.ends_with("img.bin")));
    assert_eq!((img.load_addr, img.entry), (0x10000, 0x10010));
    assert_eq!(img.privilege, ImagePrivilege::Kernel);
    let r = create_args(&[&image_args[..], &["--privilege", "user"]].concat())
        .to_request()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.image.map(|i| i.privilege), Some(ImagePrivilege::User));
    assert!(parse(&["vm", "create", "--memory", "1G", "--privilege", "user"]).is_err());

    let r = create_args(&["--memory", "256", "--backing", "hugetlbfs"]).to_request();
    assert_eq!(r.ok().and_then(|r| r.backing).map(|b| b.thp), Some(false));
    assert!(create_args(&["--memory", "lots"]).to_request().is_err());
}

#[test]
fn create_from_a_config_file() {
    let dir = std::env::temp_dir().join(format!("tp-cli-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join("vm.json");
    let _ = std::fs::write(&p, r#"{"memory_mib": 512, "vcpus": 4}"#);
    let path = p.to_string_lossy().into_owned();
    let r = create_args(&["--config", &path]).to_request();
    assert_eq!(r.map(|r| (r.memory_mib, r.vcpus)).ok(), Some((512, 4)));
    let _ = std::fs::write(&p, r#"{"memory_mib": 512, "colour": "red"}"#);
    assert!(create_args(&["--config", &path]).to_request().is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_args_build_a_config() {
    #[derive(Debug, clap::Parser)]
    struct P {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let p = P::try_parse_from([
        "serve",
        "--socket",
        "/tmp/a.sock",
        "--tcp",
        "127.0.0.1:7000",
        "--token-file",
        "/tmp/t",
    ]);
    let cfg = p
        .map_err(|e| e.to_string())
        .and_then(|p| p.serve.to_config().map_err(|e| e.to_string()));
    let cfg = cfg.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.tcp.map(|t| t.addr.port()), Some(7000));
    assert!(P::try_parse_from(["serve", "--tcp", "127.0.0.1:7000"]).is_err());
}

#[test]
fn balloon_stats_show_units_and_skip_what_the_guest_did_not_send() {
    let mut s = crate::types::BalloonStats::sizes_only(64, 32);
    s.swap_in_bytes = Some(3 << 20);
    s.swap_out_bytes = Some(512);
    s.free_mib = Some(100);
    s.oom_kills = Some(2);
    s.direct_reclaim_bytes = Some(5 << 30);
    s.unknown_tags = Some(0);
    let text = output::balloon_stats(&s);
    assert!(text.contains("3.0 MiB"), "{text}");
    assert!(text.contains("512 B"), "{text}");
    assert!(text.contains("5.0 GiB"), "{text}");
    assert!(text.contains("oom kills"), "{text}");
    assert!(!text.contains("pages"), "{text}");
    assert!(!text.contains("major faults"), "{text}");
    // No unknown tags: not worth a line.
    assert!(!text.contains("unknown"), "{text}");
}
