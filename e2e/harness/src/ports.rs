//! Free loopback ports for the components.
//!
//! Ports come from below the kernel's ephemeral range (`ip_local_port_range`, 32768–60999 by
//! default), never from it: the kernel hands ephemeral ports to every outgoing connection, so
//! a port chosen there by binding port 0 can be taken as some client's source port between the
//! moment it is chosen and the moment the component binds it (seen once in CI-like runs).
//! Below the range only another listener can take it, and candidates are random, so two test
//! processes choosing at once rarely even try the same one. Within one test process (tests run
//! on parallel threads) a port once handed out is never a candidate again: otherwise another
//! test's search could hold it for a moment, as a candidate, just as its component binds it
//! (seen in a clean-clone run: an API server that failed with "address already in use").

use std::collections::HashSet;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Where candidates come from: registered ports few services use on a test machine.
const FIRST: u16 = 20000;
const LAST: u16 = 32000;
const ATTEMPTS: usize = 1000;

/// Ports this process has handed out.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A random candidate: `RandomState` is seeded per instance from the OS.
fn candidate(counter: u64) -> u16 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(counter);
    FIRST + (hasher.finish() % u64::from(LAST - FIRST)) as u16
}

/// `n` distinct ports on 127.0.0.1 that are free now.
///
/// The listeners are held until all ports are chosen so the same port is never returned twice;
/// between closing them and the component binding its port only another listener could take
/// one, which start-up then reports with the component's log.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut listeners = Vec::with_capacity(n);
    let mut attempt = 0u64;
    while listeners.len() < n {
        attempt += 1;
        if attempt as usize > ATTEMPTS {
            return Err(Error::io("127.0.0.1", "finding free ports")(
                std::io::Error::other(format!(
                    "no free port in {FIRST}–{LAST} after {ATTEMPTS} tries"
                )),
            ));
        }
        let port = candidate(attempt);
        if handed_out(|ports| ports.contains(&port)) {
            continue;
        }
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            listeners.push(listener);
        }
    }
    let ports = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(Error::io("127.0.0.1", "reading a bound port"))?;
    handed_out(|set| set.extend(ports.iter().copied()));
    Ok(ports)
}

fn handed_out<T>(f: impl FnOnce(&mut HashSet<u16>) -> T) -> T {
    let mut guard = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    f(guard.get_or_insert_with(HashSet::new))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_distinct_and_below_the_ephemeral_range() {
        let ports = super::free_ports(5).expect("free ports");
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 5);
        assert!(
            ports
                .iter()
                .all(|p| (super::FIRST..super::LAST).contains(p)),
            "{ports:?}"
        );
    }

    #[test]
    fn a_port_handed_out_is_never_handed_out_again() {
        let first = super::free_ports(20).expect("free ports");
        // Free again on the host (nothing binds them here), yet never chosen again.
        for _ in 0..50 {
            let more = super::free_ports(20).expect("free ports");
            assert!(
                more.iter().all(|p| !first.contains(p)),
                "{more:?} repeats one of {first:?}"
            );
        }
    }
}
