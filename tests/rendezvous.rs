//! The TCP exchange that hands NCCL's unique id from rank 0 to the other ranks under torchrun
//! (issue 17). It is plain `std::net`, in every build: the ranks run here as threads over
//! 127.0.0.1.

use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use diffalign::dist::rendezvous::{fetch, Endpoint, Server};

/// Bytes of NCCL's unique id.
const ID: usize = 128;

fn local(port: u16) -> Endpoint {
    Endpoint {
        host: "127.0.0.1".into(),
        port,
    }
}

/// A port nobody listens on now (the OS's pick, released again).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A payload whose every byte differs from its neighbours, so a shifted or truncated copy shows.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

/// Ranks `1..world` fetching from `at` on threads.
fn spawn_ranks(at: &Endpoint, world: usize, timeout: Duration) -> Vec<thread::JoinHandle<diffalign::Result<Vec<u8>>>> {
    (1..world)
        .map(|rank| {
            let at = at.clone();
            thread::spawn(move || fetch(&at, rank, world, ID, timeout))
        })
        .collect()
}

#[test]
fn every_rank_receives_rank_0s_bytes() {
    let id = payload(ID);
    let server = Server::bind(0).unwrap();
    let ranks = spawn_ranks(&local(server.port()), 3, Duration::from_secs(30));
    server.serve(&id, 3, Duration::from_secs(30)).unwrap();
    for (rank, r) in ranks.into_iter().enumerate() {
        assert_eq!(r.join().unwrap().unwrap(), id, "rank {}", rank + 1);
    }
}

#[test]
fn ranks_that_start_before_rank_0_wait_for_it() {
    let id = payload(ID);
    let port = free_port();
    let ranks = spawn_ranks(&local(port), 3, Duration::from_secs(30));
    // The others are already knocking on a closed port.
    thread::sleep(Duration::from_millis(400));
    Server::bind(port)
        .unwrap()
        .serve(&id, 3, Duration::from_secs(30))
        .unwrap();
    for r in ranks {
        assert_eq!(r.join().unwrap().unwrap(), id);
    }
}

#[test]
fn no_rank_0_is_a_timeout_naming_the_rank_and_the_address() {
    let port = free_port();
    let start = Instant::now();
    let e = fetch(&local(port), 2, 4, ID, Duration::from_millis(500))
        .unwrap_err()
        .to_string();
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "gave up after {:?}",
        start.elapsed()
    );
    assert!(
        e.contains("rank 2 of 4") && e.contains(&format!("127.0.0.1:{port}")) && e.contains("no answer"),
        "{e}"
    );
}

#[test]
fn a_payload_of_another_length_is_an_error() {
    let server = Server::bind(0).unwrap();
    let ranks = spawn_ranks(&local(server.port()), 2, Duration::from_secs(30));
    server.serve(&payload(100), 2, Duration::from_secs(30)).unwrap();
    let e = ranks
        .into_iter()
        .next()
        .unwrap()
        .join()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 1 of 2") && e.contains("100 bytes") && e.contains("expected 128"),
        "{e}"
    );
}

#[test]
fn rank_0_names_the_ranks_that_never_came() {
    let server = Server::bind(0).unwrap();
    let port = server.port();
    let rank1 = thread::spawn(move || fetch(&local(port), 1, 3, ID, Duration::from_secs(30)));
    let e = server
        .serve(&payload(ID), 3, Duration::from_millis(1500))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 0") && e.contains("ranks [2]") && e.contains(&format!("port {port}")),
        "{e}"
    );
    assert_eq!(rank1.join().unwrap().unwrap(), payload(ID));
}

#[test]
fn a_rank_of_another_world_size_is_refused() {
    let server = Server::bind(0).unwrap();
    let port = server.port();
    let stray = thread::spawn(move || fetch(&local(port), 1, 4, ID, Duration::from_millis(1500)));
    let e = server
        .serve(&payload(ID), 3, Duration::from_secs(30))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 0 of 3") && e.contains("rank 1 of 4"), "{e}");
    // Refused, it never gets the bytes.
    assert!(stray.join().unwrap().is_err());
}

#[test]
fn endpoints_print_as_addresses() {
    assert_eq!(local(29501).to_string(), "127.0.0.1:29501");
    let v6 = Endpoint {
        host: "::1".into(),
        port: 29501,
    };
    assert_eq!(v6.to_string(), "[::1]:29501");
}
