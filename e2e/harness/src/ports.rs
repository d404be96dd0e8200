//! Free loopback ports for the components.

use std::net::{Ipv4Addr, TcpListener};

use crate::error::{Error, Result};

/// Asks the kernel for `n` distinct free ports on 127.0.0.1.
///
/// The listeners are held until all ports are chosen so that the kernel does
/// not hand out the same port twice; between closing them and the component
/// binding its port another process could take it, which on a test machine
/// is rare enough to accept (start-up then fails with the component's log).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(Error::io("127.0.0.1:0", "binding a free port"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(Error::io("127.0.0.1:0", "reading a bound port"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_distinct_and_nonzero() {
        let ports = super::free_ports(5).expect("free ports");
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 5);
        assert!(ports.iter().all(|p| *p != 0));
    }
}
