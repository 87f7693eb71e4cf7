//! The small TCP exchange that gives every rank rank 0's bytes (NCCL's 128-byte unique id) under
//! `torchrun`, which starts processes that share no communicator yet. Rank 0 listens, each other
//! rank connects (retrying until rank 0 is up), says who it is, and receives the bytes.
//!
//! The port is not torchrun's `MASTER_PORT`: torchrun's elastic agent on the first node already
//! hosts its own TCPStore there (the static and the c10d rendezvous both share that store with
//! the workers), so [`super::Launch::from_env`] takes `MASTER_PORT + 1` unless
//! `DIFFALIGN_RENDEZVOUS_PORT` names another.
//!
//! Wire format, little-endian: a rank sends [`MAGIC`], its rank and the world size (u32 each);
//! rank 0 answers with the payload's length (u32) and the payload.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// What a diffalign rank says first, so that a stray connection to the port is told apart.
const MAGIC: [u8; 8] = *b"dfalign1";

/// How long to wait between two tries to reach rank 0, or two polls for a new connection.
const POLL: Duration = Duration::from_millis(50);

/// Where rank 0 hands out its bytes: a host name or address and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Rank 0's host, as the others reach it (torchrun's `MASTER_ADDR`).
    pub host: String,
    /// The rendezvous port.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Rank 0's end: a socket bound on every IPv4 interface.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    port: u16,
}

impl Server {
    /// Listens on `0.0.0.0:port` (port 0 takes a free one, see [`Server::port`]).
    pub fn bind(port: u16) -> Result<Self> {
        let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
            Error::input(
                "rendezvous",
                format!("rank 0 cannot listen on 0.0.0.0:{port}: {e} (set DIFFALIGN_RENDEZVOUS_PORT to a free port)"),
            )
        })?;
        let port = listener.local_addr().map_err(|e| rendezvous_error(0, e))?.port();
        Ok(Server { listener, port })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends `payload` to each of ranks `1..world_size` once they connect; fails when they
    /// have not all come within `timeout`, naming the missing ranks, or when one says it belongs
    /// to a world of another size.
    pub fn serve(self, payload: &[u8], world_size: usize, timeout: Duration) -> Result<()> {
        let len = u32::try_from(payload.len()).map_err(|_| {
            Error::input(
                "rendezvous",
                format!("a payload of {} bytes is too long", payload.len()),
            )
        })?;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| rendezvous_error(0, e))?;
        let start = Instant::now();
        let mut served = BTreeSet::new();
        while served.len() + 1 < world_size {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                let missing: Vec<usize> = (1..world_size).filter(|r| !served.contains(r)).collect();
                return Err(Error::input(
                    "rendezvous",
                    format!(
                        "rank 0 waited {:.0} s on port {} for the other ranks of {world_size}: ranks {missing:?} never came",
                        timeout.as_secs_f64(),
                        self.port
                    ),
                ));
            }
            let (mut stream, peer) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                    std::thread::sleep(POLL.min(left));
                    continue;
                }
                Err(e) => return Err(rendezvous_error(0, e)),
            };
            // A connection that does not speak the protocol (a port scanner, a rank that gave up)
            // is dropped; the ranks that do are checked and served.
            let Ok(hello) = read_hello(&mut stream, left) else {
                continue;
            };
            let (rank, size) = hello;
            if size != world_size || rank == 0 || rank >= world_size {
                return Err(Error::input(
                    "rendezvous",
                    format!("rank 0 of {world_size}: {peer} says it is rank {rank} of {size}"),
                ));
            }
            let sent = stream
                .write_all(&len.to_le_bytes())
                .and_then(|()| stream.write_all(payload))
                .and_then(|()| stream.flush());
            // A rank whose connection broke retries and is served then.
            if sent.is_ok() {
                served.insert(rank);
            }
        }
        Ok(())
    }
}

/// The (rank, world size) a connecting rank announces, or why it did not.
fn read_hello(stream: &mut TcpStream, left: Duration) -> std::io::Result<(usize, usize)> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(left.min(Duration::from_secs(10))))?;
    stream.set_write_timeout(Some(left.min(Duration::from_secs(10))))?;
    let mut hello = [0u8; 16];
    stream.read_exact(&mut hello)?;
    if hello[..8] != MAGIC {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not a diffalign rank"));
    }
    let word = |i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().expect("4 bytes")) as usize;
    Ok((word(8), word(12)))
}

fn rendezvous_error(rank: usize, e: std::io::Error) -> Error {
    Error::input("rendezvous", format!("rank {rank}: {e}"))
}

/// Rank `rank`'s end: connects to rank 0 at `at` (retrying until `timeout`, as rank 0 may start
/// later) and returns the `len` bytes it sends. Fails naming the rank, the address and the wait
/// when rank 0 never answers, or when it sends another number of bytes.
pub fn fetch(at: &Endpoint, rank: usize, world_size: usize, len: usize, timeout: Duration) -> Result<Vec<u8>> {
    let (rank32, size32) = match (u32::try_from(rank), u32::try_from(world_size)) {
        (Ok(r), Ok(s)) => (r, s),
        _ => {
            return Err(Error::input(
                "rendezvous",
                format!("rank {rank} of {world_size} is too large"),
            ))
        }
    };
    let mut hello = MAGIC.to_vec();
    hello.extend(rank32.to_le_bytes());
    hello.extend(size32.to_le_bytes());
    let start = Instant::now();
    let mut tries = 0;
    let mut last = String::from("no address to try");
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(Error::input(
                "rendezvous",
                format!(
                    "rank {rank} of {world_size}: no answer from rank 0 at {at} within {:.0} s ({tries} tries; last: {last})",
                    timeout.as_secs_f64()
                ),
            ));
        }
        tries += 1;
        match try_fetch(at, &hello, len, left) {
            Ok(Ok(bytes)) => return Ok(bytes),
            Ok(Err(got)) => {
                return Err(Error::input(
                    "rendezvous",
                    format!(
                        "rank {rank} of {world_size}: {at} sends {got} bytes, expected {len} (is another program on that port?)"
                    ),
                ))
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(POLL.min(timeout.saturating_sub(start.elapsed())));
    }
}

/// Rank 0's answer: its bytes, or the other length it announced (the bytes left unread).
type Reply = std::result::Result<Vec<u8>, usize>;

/// One try: every address `at` resolves to, in turn, until one answers.
fn try_fetch(at: &Endpoint, hello: &[u8], len: usize, left: Duration) -> std::io::Result<Reply> {
    let addrs: Vec<SocketAddr> = (at.host.as_str(), at.port).to_socket_addrs()?.collect();
    let mut last = std::io::Error::new(ErrorKind::NotFound, format!("{} resolves to no address", at.host));
    for addr in addrs {
        match exchange(&addr, hello, len, left) {
            Ok(reply) => return Ok(reply),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn exchange(addr: &SocketAddr, hello: &[u8], len: usize, left: Duration) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(addr, left.min(Duration::from_secs(5)))?;
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    stream.write_all(hello)?;
    let mut announced = [0u8; 4];
    stream.read_exact(&mut announced)?;
    let announced = u32::from_le_bytes(announced) as usize;
    if announced != len {
        return Ok(Err(announced));
    }
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes)?;
    Ok(Ok(bytes))
}
