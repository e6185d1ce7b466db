//! Reading and writing a TCP stream by deadlines: a message must arrive (or leave) whole within
//! the channel's timeout, however the peer spaces its bytes, so a peer that trickles one byte at a
//! time cannot hold a connection open. Waiting for the first byte of the next message is separate:
//! an idle peer is told apart from one that stalls mid-message.

use crate::channel::ChannelError;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// Bytes read from the socket at once, at most: small messages cost one system call for several.
const READ_BUFFER: usize = 1 << 20;
/// The same before the peer has authenticated: an unauthenticated peer gets a few KiB of memory.
const HANDSHAKE_BUFFER: usize = 4 << 10;

/// A TCP stream with its peer's name, the channel's timeout and a read buffer.
pub(crate) struct Wire {
    pub stream: TcpStream,
    pub peer: String,
    pub timeout: Option<Duration>,
    buffer: Vec<u8>,
    /// How large `buffer` may grow: small until the peer has authenticated ([`Wire::trust`]).
    capacity: usize,
    /// The unread bytes are `buffer[start..end]`.
    start: usize,
    end: usize,
    /// Set by the first failure that left the stream out of step; every later call is refused.
    broken: Option<String>,
}

impl Wire {
    pub fn new(stream: TcpStream, timeout: Option<Duration>) -> Result<Wire, ChannelError> {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "tcp peer".into());
        let io = |source| ChannelError::Io { peer: peer.clone(), source };
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(timeout).map_err(io)?;
        stream.set_write_timeout(timeout).map_err(io)?;
        Ok(Wire {
            stream,
            peer,
            timeout,
            buffer: Vec::new(),
            capacity: HANDSHAKE_BUFFER,
            start: 0,
            end: 0,
            broken: None,
        })
    }

    /// Lets the read buffer grow to its full size (the peer has authenticated, or will never be).
    pub fn trust(&mut self) {
        self.capacity = READ_BUFFER;
    }

    /// Refuses a call on a stream an earlier failure left out of step.
    pub fn check_open(&self) -> Result<(), ChannelError> {
        match &self.broken {
            Some(cause) => Err(ChannelError::Broken { peer: self.peer.clone(), cause: cause.clone() }),
            None => Ok(()),
        }
    }

    /// Marks the stream broken by `e` and closes it.
    pub fn fail(&mut self, e: ChannelError) -> ChannelError {
        self.broken = Some(e.to_string());
        self.close();
        e
    }

    /// A receive's outcome: a timeout before any byte of the message leaves the stream in step;
    /// any other failure breaks it.
    pub fn settle<T>(&mut self, outcome: Result<T, ChannelError>) -> Result<T, ChannelError> {
        match outcome {
            Err(e @ ChannelError::Timeout { .. }) => Err(e),
            Err(e) => Err(self.fail(e)),
            ok => ok,
        }
    }

    /// The deadline of a message that starts now.
    pub fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|t| Instant::now() + t)
    }

    /// Waits up to the timeout for the first byte of the next message. When none came the error
    /// is [`ChannelError::Timeout`]: the peer is idle, nothing was consumed, and [`Wire::settle`]
    /// leaves the stream open.
    pub fn first_byte(&mut self) -> Result<u8, ChannelError> {
        if self.start == self.end {
            self.stream.set_read_timeout(self.timeout).map_err(|e| self.classify(e, "while waiting for a message"))?;
            loop {
                match self.fill() {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        let after = self.timeout.unwrap_or_default();
                        return Err(ChannelError::Timeout { peer: self.peer.clone(), after });
                    }
                    Err(e) => return Err(self.classify(e, "while waiting for a message")),
                }
            }
        }
        self.start += 1;
        Ok(self.buffer[self.start - 1])
    }

    /// Fills `buf` before `deadline`.
    pub fn read_by(&mut self, buf: &mut [u8], deadline: Option<Instant>, context: &str) -> Result<(), ChannelError> {
        let mut done = 0;
        while done < buf.len() {
            if self.start == self.end {
                let wanted = buf.len() - done;
                if wanted >= self.capacity {
                    // Large reads go straight into `buf`.
                    self.arm(deadline, context, true)?;
                    match self.stream.read(&mut buf[done..]) {
                        Ok(0) => return Err(self.classify(ErrorKind::UnexpectedEof.into(), context)),
                        Ok(n) => done += n,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(self.classify(e, context)),
                    }
                    continue;
                }
                self.arm(deadline, context, true)?;
                match self.fill() {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.classify(e, context)),
                }
            }
            let n = (self.end - self.start).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&self.buffer[self.start..self.start + n]);
            self.start += n;
            done += n;
        }
        Ok(())
    }

    /// Reads what the socket has (at least one byte, or an error) into the empty buffer.
    fn fill(&mut self) -> std::io::Result<()> {
        if self.buffer.len() < self.capacity {
            self.buffer.resize(self.capacity, 0);
        }
        let n = self.stream.read(&mut self.buffer)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        (self.start, self.end) = (0, n);
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
        let Some(deadline) = deadline else {
            // No deadline: no socket timeout either (a handshake's may still be set).
            let set = if read { self.stream.set_read_timeout(None) } else { self.stream.set_write_timeout(None) };
            return set.map_err(|e| self.classify(e, context));
        };
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
