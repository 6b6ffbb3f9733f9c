//! Costs of the networking steps, printed for docs/networking.md.
//!
//!     cargo test -p xcgi-net --release --test measure -- --ignored --nocapture
//!
//! Needs root and /dev/net/tun, like the other tests.

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xcgi_net::{NetNs, Pool, PoolConfig, Tap};

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let n = samples.len();
    let median = samples[n / 2];
    let p90 = samples[(n * 9 / 10).min(n - 1)];
    let mean = samples.iter().sum::<Duration>() / n as u32;
    println!(
        "{label:<58} n={n:<4} median {:>8.1} us  p90 {:>8.1} us  mean {:>8.1} us  min {:>8.1} us",
        us(median),
        us(p90),
        us(mean),
        us(samples[0])
    );
}

fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let r = f();
    (t.elapsed(), r)
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn measure_costs() {
    const N: usize = 200;
    let ns = Arc::new(NetNs::create(Some(&common::ns_name("measure"))).expect("namespace"));

    // Namespace creation itself (unnamed: no bind mount).
    let samples = (0..20)
        .map(|_| timed(|| NetNs::create(None).expect("namespace")).0)
        .collect();
    summary(
        "NetNs::create(None) (thread, unshare, lo up, sysctls)",
        samples,
    );

    // A thread inside the namespace doing nothing.
    let samples = (0..N)
        .map(|_| timed(|| ns.run(|| ()).expect("run")).0)
        .collect();
    summary("NetNs::run(|| ()) (thread spawn + setns + join)", samples);

    // Bare TAP creation (open + TUNSETIFF + TUNSETVNETHDRSZ + ifindex), inside one thread.
    let (create, destroy) = ns
        .run(|| {
            let mut create = Vec::new();
            let mut destroy = Vec::new();
            for i in 0..N {
                let name = format!("xcgim{i}");
                let (d, tap) = timed(|| Tap::create(&name).expect("tap"));
                create.push(d);
                destroy.push(timed(|| drop(tap)).0);
            }
            (create, destroy)
        })
        .expect("run");
    summary("Tap::create, on a thread already in the namespace", create);
    summary("close an unconfigured TAP (destroys it)", destroy);

    // The on-demand path of the pool: thread + TAP + link up + address + neighbour.
    let pool = Pool::new(
        Arc::clone(&ns),
        PoolConfig {
            size: N as u32,
            prefill: 0,
            ..PoolConfig::default()
        },
    )
    .expect("pool");
    let mut create = Vec::new();
    let mut leases = Vec::new();
    for _ in 0..N {
        let (d, lease) = timed(|| pool.lease().expect("lease"));
        create.push(d);
        leases.push(lease);
    }
    summary(
        "lease, created on demand (thread+TAP+up+addr+neigh)",
        create,
    );
    // Return without refill (prefill 0), all at once: the caller's cost, then the time until
    // every TAP is destroyed (the background closes overlap).
    let t = Instant::now();
    let samples = leases.into_iter().map(|l| timed(|| drop(l)).0).collect();
    summary(
        "drop lease: caller's cost (hands the TAP to a thread)",
        samples,
    );
    assert!(pool.wait_idle(Duration::from_secs(30)));
    let d = t.elapsed();
    println!(
        "{:<58} {:.1} ms total, {:.1} us per TAP",
        format!("{N} leases dropped at once until all TAPs destroyed"),
        d.as_secs_f64() * 1e3,
        d.as_secs_f64() * 1e6 / N as f64
    );
    drop(pool);

    // Prefilled pool: startup, lease, and return with refill.
    let (d, pool) = timed(|| {
        Pool::new(
            Arc::clone(&ns),
            PoolConfig {
                size: 64,
                prefill: 64,
                ..PoolConfig::default()
            },
        )
        .expect("pool")
    });
    println!(
        "{:<58} {:.1} ms total, {:.1} us per TAP",
        "Pool::new with prefill 64 (one thread)",
        d.as_secs_f64() * 1e3,
        d.as_secs_f64() * 1e6 / 64.0
    );
    let mut lease_t = Vec::new();
    let mut return_t = Vec::new();
    for _ in 0..N {
        let (d, lease) = timed(|| pool.lease().expect("lease"));
        lease_t.push(d);
        return_t.push(
            timed(|| {
                drop(lease);
                assert!(pool.wait_idle(Duration::from_secs(5)));
            })
            .0,
        );
    }
    summary("lease from a prefilled pool", lease_t);
    summary(
        "one return, until done (close + check + recreate)",
        return_t,
    );
    let d = timed(|| drop(pool)).0;
    println!(
        "{:<58} {:.1} ms",
        "drop a pool holding 64 ready TAPs (parallel closes)",
        d.as_secs_f64() * 1e3
    );

    // Worst case for a caller: a full pool, the only slot just returned.
    let pool = Pool::new(
        Arc::clone(&ns),
        PoolConfig {
            size: 1,
            prefill: 1,
            ..PoolConfig::default()
        },
    )
    .expect("pool");
    let mut lease = pool.lease().expect("lease");
    let mut samples = Vec::new();
    for _ in 0..50 {
        drop(lease);
        let (d, l) = timed(|| pool.lease().expect("lease after return"));
        samples.push(d);
        lease = l;
    }
    summary("lease on a full pool right after a return (waits)", samples);
    drop(lease);
    drop(pool);
    let pool = Pool::new(
        Arc::clone(&ns),
        PoolConfig {
            size: 4,
            prefill: 4,
            ..PoolConfig::default()
        },
    )
    .expect("pool");

    // The alternative to recreating: keep the TAP and flush it (drain its queue, re-apply
    // the header size). Measured for comparison only.
    let lease = pool.lease().expect("lease");
    let fd = lease.tap_fd().as_raw_fd();
    let mut buf = vec![0u8; 65536];
    let samples = (0..N)
        .map(|_| {
            timed(|| {
                // SAFETY: read into our buffer; ioctl with a valid int pointer.
                unsafe {
                    while libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) > 0 {}
                    let len: libc::c_int = 12;
                    libc::ioctl(fd, 0x4004_54d8, &len as *const libc::c_int);
                }
            })
            .0
        })
        .collect();
    summary("flush alternative (drain queue + TUNSETVNETHDRSZ)", samples);
}
