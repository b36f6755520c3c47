//! systemd's notification protocol (`sd_notify(3)`), without libsystemd:
//! one datagram of `KEY=VALUE` lines to the socket named by
//! `NOTIFY_SOCKET`, a path or, after `@`, an abstract socket name.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use crate::error::{Error, Result};

/// A connection to the service manager, or nothing outside one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` when
    /// `WATCHDOG_PID` is unset or this process.
    pub fn from_env() -> Result<Self> {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        let target = match socket {
            None => None,
            Some(name) => {
                let name = name.to_string_lossy().into_owned();
                let addr = socket_addr(&name)?;
                let socket = UnixDatagram::unbound().map_err(|e| io_error(&name, e))?;
                Some((socket, addr))
            }
        };
        Ok(Notifier { target, watchdog })
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// systemd's watchdog timeout (`WatchdogSec=`), if it asks for pings.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state`: newline-separated assignments (`READY=1`, `STATUS=...`).
    pub fn notify(&self, state: &str) -> Result<()> {
        let Some((socket, addr)) = &self.target else {
            return Ok(());
        };
        socket
            .send_to_addr(state.as_bytes(), addr)
            .map(|_| ())
            .map_err(|e| io_error("NOTIFY_SOCKET", e))
    }

    pub fn ready(&self, status: &str) -> Result<()> {
        self.notify(&format!("READY=1\nSTATUS={}", status_line(status)))
    }

    pub fn status(&self, status: &str) -> Result<()> {
        self.notify(&format!("STATUS={}", status_line(status)))
    }

    pub fn watchdog_ping(&self) -> Result<()> {
        self.notify("WATCHDOG=1")
    }

    pub fn stopping(&self, status: &str) -> Result<()> {
        self.notify(&format!("STOPPING=1\nSTATUS={}", status_line(status)))
    }
}

/// A status is one line: newlines would start new assignments.
fn status_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

/// `NOTIFY_SOCKET`'s address: a filesystem path, or `@name` for the
/// abstract namespace.
fn socket_addr(name: &str) -> Result<SocketAddr> {
    if let Some(abstract_name) = name.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            return SocketAddr::from_abstract_name(abstract_name.as_bytes()).map_err(|e| io_error(name, e));
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = abstract_name;
            return Err(io_error(
                name,
                std::io::Error::new(std::io::ErrorKind::Unsupported, "abstract sockets are Linux-only"),
            ));
        }
    }
    if !name.starts_with('/') {
        return Err(io_error(
            name,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor @abstract",
            ),
        ));
    }
    SocketAddr::from_pathname(name).map_err(|e| io_error(name, e))
}

/// The watchdog timeout when systemd wants this process to ping.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

fn io_error(what: &str, source: std::io::Error) -> Error {
    Error::ServiceIo {
        what: format!("sd_notify to {what}"),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_only_for_this_process() {
        assert_eq!(
            watchdog_interval(Some("3000000"), None, 7),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            watchdog_interval(Some("3000000"), Some("7"), 7),
            Some(Duration::from_secs(3))
        );
        assert_eq!(watchdog_interval(Some("3000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn sends_to_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                socket_addr(path.to_str().unwrap()).unwrap(),
            )),
            watchdog: None,
        };
        notifier.ready("up\nand running").unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up and running");

        let name = format!("@elastic-edge-test-{}", std::process::id());
        let addr = socket_addr(&name).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), addr)),
            watchdog: None,
        };
        notifier.watchdog_ping().unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn a_relative_socket_is_refused() {
        assert!(socket_addr("notify.sock").is_err());
    }
}
