//! Many activation flips under continuous load: no connection fails, none reaches a standby.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use reuseport_client::ControlClient;

use crate::harness::{
    ServerKind, Tally, TestEnv, group, load_size, local, request_once, slow_bound,
};

/// Flips on the host, and in a VM guest, where 10,000 took 82-130 s under emulation.
const FLIPS: u64 = 10_000;
const FLIPS_IN_VM: u64 = 1_000;
const CLIENT_THREADS: usize = 3;

/// 10,000 flips on the host, 1,000 in a VM guest (the count is printed).
#[test]
fn thousands_of_flips_under_load_lose_no_connection() {
    const PORT: u16 = 7601;
    let env = TestEnv::new("thousands_of_flips_under_load_lose_no_connection");
    let flips = load_size("flips", FLIPS, FLIPS_IN_VM);
    let g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let g2 = env.serve(PORT, 2, ServerKind::Tokio, false);
    let g3 = env.serve(PORT, 3, ServerKind::Tokio, false);

    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENT_THREADS)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                let (mut t, mut n, mut slowest) = (Tally::default(), 0, Duration::ZERO);
                while !done.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    t.record(request_once(local(PORT), n));
                    slowest = slowest.max(start.elapsed());
                    n += 1;
                }
                (t, slowest)
            })
        })
        .collect();

    let started = Instant::now();
    env.block_on(async {
        let mut c = ControlClient::connect(env.control_path())
            .await
            .expect("connect to the agent");
        for i in 0..flips {
            let g = if i % 2 == 0 { 2 } else { 1 };
            let changed = c
                .activate(group(PORT), g)
                .await
                .unwrap_or_else(|e| panic!("flip {i} (activate {g}) should succeed: {e}"));
            assert_eq!(
                changed.active,
                Some(g),
                "flip {i}: generation {g} should be active: {changed:?}"
            );
        }
    });
    let flip_time = started.elapsed();
    done.store(true, Ordering::Relaxed);

    let (mut t, mut slowest) = (Tally::default(), Duration::ZERO);
    for c in clients {
        let (ct, cs) = c.join().expect("client thread");
        t.merge(&ct);
        slowest = slowest.max(cs);
    }
    let status = env.status(PORT);
    println!(
        "{flips} flips in {flip_time:?} ({:.1} µs/flip) with {CLIENT_THREADS} client threads: {t}; \
         slowest connection {slowest:?} (slower than {:?} counts as failed); \
         servers: gen1 {} gen2 {} gen3 {}; unsteered {}",
        flip_time.as_micros() as f64 / flips as f64,
        slow_bound(),
        g1.server.served(),
        g2.server.served(),
        g3.server.served(),
        status.unsteered,
    );
    assert!(
        t.answered() > 0,
        "clients should have made connections during the flips: {t}"
    );
    assert_eq!(
        t.failed, 0,
        "no connection should be refused, fail or be slow during the flips: {t}"
    );
    assert_eq!(
        t.of(3),
        0,
        "standby generation 3 should receive no connection: {t}"
    );
    assert_eq!(
        t.answered(),
        t.of(1) + t.of(2),
        "every connection should be answered by generation 1 or 2: {t}"
    );
    assert_eq!(
        g3.server.accepted(),
        0,
        "standby generation 3's listener should accept nothing"
    );
    assert_eq!(
        status.active,
        Some(1),
        "after an even number of flips generation 1 should be active: {status:?}"
    );
    assert_eq!(
        status.unsteered, 0,
        "no connection should be handed back to the kernel's hash: {status:?}"
    );
}
