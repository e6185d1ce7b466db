//! Reading and writing a TCP stream by deadlines: a message must arrive (or leave) whole within
//! the channel's timeout, however the peer spaces its bytes, so a peer that trickles one byte at a
//! time cannot hold a connection open. Waiting for the first byte of the next message is separate:
//! an idle peer is told apart from one that stalls mid-message.

use crate::channel::ChannelError;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// A TCP stream with its peer's name and the channel's timeout.
pub(crate) struct Wire {
    pub stream: TcpStream,
    pub peer: String,
    pub timeout: Option<Duration>,
}

impl Wire {
    pub fn new(stream: TcpStream, timeout: Option<Duration>) -> Result<Wire, ChannelError> {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "tcp peer".into());
        let io = |source| ChannelError::Io { peer: peer.clone(), source };
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(timeout).map_err(io)?;
        stream.set_write_timeout(timeout).map_err(io)?;
        Ok(Wire { stream, peer, timeout })
    }

    /// The deadline of a message that starts now.
    pub fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|t| Instant::now() + t)
    }

    /// Waits up to the timeout for the first byte of the next message. `Ok(None)` when none came
    /// (the peer is idle, nothing was consumed).
    pub fn first_byte(&mut self) -> Result<Option<u8>, ChannelError> {
        self.stream.set_read_timeout(self.timeout).map_err(|e| self.classify(e, "while waiting for a message"))?;
        let mut b = [0u8; 1];
        loop {
            return match self.stream.read(&mut b) {
                Ok(0) => Err(self.classify(ErrorKind::UnexpectedEof.into(), "while waiting for a message")),
                Ok(_) => Ok(Some(b[0])),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
                Err(e) => Err(self.classify(e, "while waiting for a message")),
            };
        }
    }

    /// Fills `buf` before `deadline`.
    pub fn read_by(&mut self, buf: &mut [u8], deadline: Option<Instant>, context: &str) -> Result<(), ChannelError> {
        let mut done = 0;
        while done < buf.len() {
            self.arm(deadline, context, true)?;
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => return Err(self.classify(ErrorKind::UnexpectedEof.into(), context)),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.classify(e, context)),
            }
        }
        Ok(())
    }

    /// Writes all of `bytes` before `deadline`.
    pub fn write_by(&mut self, bytes: &[u8], deadline: Option<Instant>) -> Result<(), ChannelError> {
        let mut done = 0;
        while done < bytes.len() {
            self.arm(deadline, "while sending", false)?;
            match self.stream.write(&bytes[done..]) {
                Ok(0) => return Err(self.classify(ErrorKind::WriteZero.into(), "while sending")),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.classify(e, "while sending")),
            }
        }
        Ok(())
    }

    /// Sets the socket's timeout to what is left before `deadline`.
    fn arm(&mut self, deadline: Option<Instant>, context: &str, read: bool) -> Result<(), ChannelError> {
        let Some(deadline) = deadline else { return Ok(()) };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.late(context));
        }
        let set =
            if read { self.stream.set_read_timeout(Some(left)) } else { self.stream.set_write_timeout(Some(left)) };
        set.map_err(|e| self.classify(e, context))
    }

    fn late(&self, context: &str) -> ChannelError {
        ChannelError::Deadline {
            peer: self.peer.clone(),
            after: self.timeout.unwrap_or_default(),
            context: context.into(),
        }
    }

    /// Closes both directions (the peer sees the connection end).
    pub fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Names a dead or hung peer as such, whichever side of the socket noticed first: a peer that
    /// died shows up as end of file or a reset when reading and as a broken pipe or a reset when
    /// writing.
    pub fn classify(&self, e: std::io::Error, context: &str) -> ChannelError {
        match e.kind() {
            ErrorKind::UnexpectedEof => ChannelError::Closed { peer: self.peer.clone(), context: context.to_string() },
            ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::WriteZero => {
                ChannelError::Closed { peer: self.peer.clone(), context: format!("{context} ({e})") }
            }
            ErrorKind::WouldBlock | ErrorKind::TimedOut => self.late(context),
            _ => ChannelError::Io { peer: self.peer.clone(), source: e },
        }
    }
}
