//! Not a test: the entry point of [`ChildServer`](crate::harness::ChildServer) processes.

/// Serves one generation when started by `ChildServer::spawn`; does nothing when run by hand.
#[test]
#[ignore = "helper: entry point of child server processes, started by other tests"]
fn serve_generation() {
    crate::harness::child_server_main();
}
