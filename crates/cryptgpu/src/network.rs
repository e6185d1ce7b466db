//! The three parties as separate processes (or machines), and the data owner's links to them:
//! TCP, mutually authenticated and encrypted ([`Link`]: Noise XX with every key pinned).
//!
//! Links. Each party listens on one address. Party `i` dials party `j` for what `i` sends to `j`,
//! so every pair of parties has two connections, one per direction, and the data owner dials each
//! party once. A connection proves its key in the handshake (the listener accepts only the keys
//! of its two neighbours and of the owner), then names its purpose in a first message
//! (`cryptgpu party 0 to 1`, `cryptgpu owner`), which must be the one that key may ask for; the
//! handshake's own purpose is the listening party (`cryptgpu to party 1`), because the listener
//! has to choose it before it knows who is connecting. Anything else is refused with the reason.
//!
//! Why one connection per direction: the protocols often have every party send to its next
//! neighbour and then receive from its previous one. Over TCP a large send blocks until the peer
//! reads, so three blocking sends around the ring would wait on each other forever. A
//! [`PeerLink`] hands what it sends to a writer thread of its own, through a queue, and reads the
//! other direction itself: a send never waits for the peer.
//!
//! Failures. A party whose link fails (to a neighbour or to the owner) tells its neighbours why
//! before it closes ([`PeerLink`] sends the first failure its links saw), so that a party killed
//! mid-run is named by the parties that learn of it second-hand, and by the owner they report to.

use crate::party::{MpcError, Party};
use crate::ring::{FixedPoint, DEFAULT_FRAC_BITS};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use trustsplit_boundary::{
    printable, Channel, ChannelError, ChannelOptions, Frame, KeyPair, Link, LinkPolicy, PublicKey,
};

/// How long a party or the owner waits for the next message. Long: a party may compute for
/// minutes between two messages on a large model (a VGG16 layer's products on shares), and the
/// owner waits for a whole step's logits.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest message: a VGG16 batch of shares (two ring elements per value) fits.
pub const MAX_FRAME_BYTES: usize = 1 << 31;
/// The purpose the data owner's link names.
pub const OWNER_PURPOSE: &str = "cryptgpu owner";
/// How long a closing link waits for its queued messages to leave.
const FLUSH_LIMIT: Duration = Duration::from_secs(30);
/// How often a party tries again to reach a neighbour that is not listening yet.
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// The longest purpose, answer or failure note read.
const MAX_NOTE_BYTES: usize = 4096;

/// Messages of the links themselves (the protocols' tags are `0x47xx`).
pub mod tag {
    /// The connecting side's purpose.
    pub const HELLO: u16 = 0x4a01;
    /// The purpose is accepted (for the owner: the party is ready).
    pub const WELCOME: u16 = 0x4a02;
    /// The purpose is refused; the payload says why.
    pub const REFUSED: u16 = 0x4a03;
    /// The sender stops because one of its links failed; the payload is that failure.
    pub const ABORT: u16 = 0x4a04;
}

/// The limits of every link here.
pub fn link_options() -> ChannelOptions {
    ChannelOptions { max_frame_bytes: MAX_FRAME_BYTES, timeout: Some(LINK_TIMEOUT) }
}

/// The purpose party `from`'s link to party `to` names.
pub fn party_purpose(from: usize, to: usize) -> String {
    format!("cryptgpu party {from} to {to}")
}

/// The purpose of every handshake with party `to`'s listener.
pub fn purpose_to(to: usize) -> String {
    format!("cryptgpu to party {to}")
}

/// Where the three parties listen and who they are: the same lists on every party and on the
/// owner (`--peers`, `--party-keys`).
#[derive(Clone, Debug, PartialEq)]
pub struct Parties {
    pub addrs: Vec<String>,
    pub keys: Vec<PublicKey>,
}

impl Parties {
    pub fn new(addrs: Vec<String>, keys: Vec<PublicKey>) -> Result<Parties, MpcError> {
        if addrs.len() != 3 || addrs.iter().any(|a| a.trim().is_empty()) {
            return Err(MpcError::Invalid(format!(
                "--peers lists {} address(es); give the three parties' HOST:PORT, party 0, 1, 2 in order",
                addrs.len()
            )));
        }
        if keys.len() != 3 {
            return Err(MpcError::Invalid(format!(
                "--party-keys lists {} key(s); give the three parties' public keys (trustsplit keygen), party 0, 1, 2 \
                 in order",
                keys.len()
            )));
        }
        if keys[0] == keys[1] || keys[1] == keys[2] || keys[0] == keys[2] {
            return Err(MpcError::Invalid("--party-keys names one key twice; each party needs its own".into()));
        }
        Ok(Parties { addrs: addrs.into_iter().map(|a| a.trim().to_string()).collect(), keys })
    }

    /// Party `i` as errors name it.
    pub fn name(&self, i: usize) -> String {
        format!("party {i} ({})", self.addrs[i])
    }
}

/// One party's settings (`trustsplit party`).
#[derive(Clone, Debug)]
pub struct PartyConfig {
    pub id: usize,
    pub parties: Parties,
    /// The only data owner whose run this party serves.
    pub owner_key: PublicKey,
    /// How long to wait for the other two parties to come up and link.
    pub wait: Duration,
}

/// Who a connection is, by the key it proved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Party(usize),
    Owner,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Party(i) => write!(f, "party {i}"),
            Role::Owner => f.write_str("the data owner"),
        }
    }
}

/// What the listener thread reports.
enum Arrival {
    Linked(Role, Box<Link>, SocketAddr),
    Refused(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `e` with its peer named `name` (a party and its listening address, rather than whichever
/// ephemeral port its connection came from).
fn renamed(e: ChannelError, name: &str) -> ChannelError {
    use ChannelError::*;
    let peer = name.to_string();
    match e {
        BadMagic { found, .. } => BadMagic { peer, found },
        Version { found, .. } => Version { peer, found },
        TooLarge { len, max, .. } => TooLarge { peer, len, max },
        UnexpectedTag { expected, found, .. } => UnexpectedTag { peer, expected, found },
        Closed { context, .. } => Closed { peer, context },
        Timeout { after, .. } => Timeout { peer, after },
        Deadline { after, context, .. } => Deadline { peer, after, context },
        Broken { cause, .. } => Broken { peer, cause },
        Handshake { reason, .. } => Handshake { peer, reason },
        Refused { reason, .. } => Refused { peer, reason },
        Io { source, .. } => Io { peer, source },
        Malformed { reason, .. } => Malformed { peer, reason },
        Authentication { .. } => Authentication { peer },
    }
}

/// Names its purpose on a freshly connected link and waits for the answer.
fn introduce(link: &mut Link, purpose: &str) -> Result<(), String> {
    link.send(tag::HELLO, purpose.as_bytes()).map_err(|e| e.to_string())?;
    let answer = link.recv_limited(MAX_NOTE_BYTES).map_err(|e| e.to_string())?;
    match answer.tag {
        tag::WELCOME => Ok(()),
        tag::REFUSED => Err(format!("it refused the link: {}", printable(&answer.payload))),
        other => Err(format!("it answered with message tag {other:#x} instead of a welcome")),
    }
}

/// A link to a neighbouring party: what this party sends goes out on the connection it dialed,
/// through a writer thread (a send returns at once); what it receives comes in on the
/// connection the neighbour dialed. A failure of the writer is reported by the next send or
/// receive.
pub struct PeerLink {
    name: String,
    queue: Option<mpsc::Sender<Frame>>,
    /// Disconnects when the writer thread ends.
    written: Option<mpsc::Receiver<()>>,
    writer_failure: Arc<Mutex<Option<ChannelError>>>,
    inbound: Link,
    /// The failure this link reported, repeated by every later call.
    failed: Option<String>,
    /// The first failure any of this party's links saw (shared by its two links).
    cause: Arc<Mutex<Option<String>>>,
}

impl PeerLink {
    fn new(
        name: String,
        mut outbound: Link,
        inbound: Link,
        cause: Arc<Mutex<Option<String>>>,
    ) -> std::io::Result<PeerLink> {
        let (queue, frames) = mpsc::channel::<Frame>();
        let (done, written) = mpsc::channel::<()>();
        let writer_failure = Arc::new(Mutex::new(None));
        let (failure, writer_name) = (writer_failure.clone(), name.clone());
        std::thread::Builder::new().name(format!("cryptgpu link to {name}")).spawn(move || {
            let _done = done;
            for frame in frames {
                if let Err(e) = outbound.send(frame.tag, &frame.payload) {
                    *lock(&failure) = Some(renamed(e, &writer_name));
                    return;
                }
            }
        })?;
        Ok(PeerLink { name, queue: Some(queue), written: Some(written), writer_failure, inbound, failed: None, cause })
    }

    fn fail(&mut self, e: ChannelError) -> ChannelError {
        let text = e.to_string();
        self.failed.get_or_insert_with(|| text.clone());
        lock(&self.cause).get_or_insert(text);
        e
    }

    fn aborted(&self, note: &[u8]) -> ChannelError {
        ChannelError::Closed {
            peer: self.name.clone(),
            context: format!("because a link of its own failed ({})", printable(note)),
        }
    }

    /// Refuses a call after an earlier failure of this link or of its writer.
    fn check(&mut self) -> Result<(), ChannelError> {
        if let Some(cause) = &self.failed {
            return Err(ChannelError::Broken { peer: self.name.clone(), cause: cause.clone() });
        }
        let pending = lock(&self.writer_failure).take();
        match pending {
            Some(e) => Err(self.writer_failed(e)),
            None => Ok(()),
        }
    }

    /// Reports the writer's failure, or, when the neighbour closed after failing itself, the
    /// reason it sent last: that names the party that really failed.
    fn writer_failed(&mut self, e: ChannelError) -> ChannelError {
        let peer_closed = !matches!(e, ChannelError::Timeout { .. } | ChannelError::Deadline { .. });
        let e = match peer_closed.then(|| self.inbound.recv_limited(MAX_NOTE_BYTES)) {
            Some(Ok(f)) if f.tag == tag::ABORT => self.aborted(&f.payload),
            _ => e,
        };
        self.fail(e)
    }
}

impl Channel for PeerLink {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        self.check()?;
        if payload.len() > MAX_FRAME_BYTES {
            return Err(ChannelError::TooLarge { peer: self.name.clone(), len: payload.len(), max: MAX_FRAME_BYTES });
        }
        let queued = self.queue.as_ref().is_some_and(|q| q.send(Frame { tag, payload: payload.to_vec() }).is_ok());
        if !queued {
            // The writer ended: it failed (and said how) between the check and the send.
            let e = lock(&self.writer_failure).take().unwrap_or_else(|| ChannelError::Closed {
                peer: self.name.clone(),
                context: "while sending (the link's writer stopped)".into(),
            });
            return Err(self.writer_failed(e));
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<Frame, ChannelError> {
        self.recv_limited(usize::MAX)
    }

    fn recv_limited(&mut self, max_payload: usize) -> Result<Frame, ChannelError> {
        self.check()?;
        // A neighbour's failure note may be longer than the message expected here.
        let frame = match self.inbound.recv_limited(max_payload.max(MAX_NOTE_BYTES)) {
            Ok(f) => f,
            Err(e) => {
                let e = renamed(e, &self.name);
                return Err(self.fail(e));
            }
        };
        if frame.tag == tag::ABORT {
            let e = self.aborted(&frame.payload);
            return Err(self.fail(e));
        }
        if frame.payload.len() > max_payload {
            let e = ChannelError::TooLarge { peer: self.name.clone(), len: frame.payload.len(), max: max_payload };
            return Err(self.fail(e));
        }
        Ok(frame)
    }

    fn peer(&self) -> String {
        self.name.clone()
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        // A neighbour that waits on this party would otherwise see only a closed connection and
        // blame this party for a failure it merely passed on.
        let cause = lock(&self.cause).clone();
        if let (Some(queue), Some(cause)) = (&self.queue, cause) {
            let mut note = cause.into_bytes();
            note.truncate(MAX_NOTE_BYTES);
            let _ = queue.send(Frame { tag: tag::ABORT, payload: note });
        }
        self.queue = None;
        if let Some(written) = self.written.take() {
            // Disconnected once the writer has sent everything queued (or given up).
            let _ = written.recv_timeout(FLUSH_LIMIT);
        }
    }
}

/// A link whose errors name the party (or owner) at its end.
struct Named {
    link: Link,
    name: String,
    /// A party's first failure, which its neighbours are told (on a party's link to the owner).
    cause: Option<Arc<Mutex<Option<String>>>>,
}

impl Named {
    fn failed(&self, e: ChannelError) -> ChannelError {
        let e = renamed(e, &self.name);
        if let Some(cause) = &self.cause {
            lock(cause).get_or_insert_with(|| e.to_string());
        }
        e
    }
}

impl Channel for Named {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        self.link.send(tag, payload).map_err(|e| self.failed(e))
    }
    fn recv(&mut self) -> Result<Frame, ChannelError> {
        self.link.recv().map_err(|e| self.failed(e))
    }
    fn recv_limited(&mut self, max_payload: usize) -> Result<Frame, ChannelError> {
        self.link.recv_limited(max_payload).map_err(|e| self.failed(e))
    }
    fn peer(&self) -> String {
        self.name.clone()
    }
}

/// One party's listener and the links it has gathered.
pub struct PartyNode {
    config: PartyConfig,
    key: Arc<KeyPair>,
    addr: SocketAddr,
    arrivals: mpsc::Receiver<Arrival>,
    /// Tells the listener thread to stop accepting.
    stop: Arc<AtomicBool>,
    /// Links that came in before they were waited for.
    arrived: Vec<(Role, Box<Link>, SocketAddr)>,
    /// Connections refused so far, for the error when a party never links.
    refusals: Vec<String>,
    /// The first failure of any of this party's links, the owner's included.
    cause: Arc<Mutex<Option<String>>>,
}

impl PartyNode {
    /// Starts accepting on `listener` (the address the other parties and the owner dial).
    pub fn start(listener: TcpListener, key: Arc<KeyPair>, config: PartyConfig) -> Result<PartyNode, MpcError> {
        let id = config.id;
        let setup = |reason: String| MpcError::Setup { party: id, reason };
        if id > 2 {
            return Err(MpcError::Invalid(format!("party ids are 0, 1 and 2, not {id}")));
        }
        if config.parties.keys[id] != key.public() {
            return Err(setup(format!(
                "this key's public key is {}, but --party-keys says party {id}'s is {}",
                key.public(),
                config.parties.keys[id]
            )));
        }
        if config.parties.keys.contains(&config.owner_key) {
            return Err(setup("--owner-key is one of --party-keys; the data owner needs a key of its own".into()));
        }
        let addr = listener.local_addr().map_err(|e| setup(format!("the listener: {e}")))?;
        listener.set_nonblocking(true).map_err(|e| setup(format!("the listener: {e}")))?;
        let (tx, arrivals) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (k, c, s) = (key.clone(), config.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("cryptgpu party {id} listener"))
            .spawn(move || listen(listener, k, c, tx, s))
            .map_err(|e| setup(format!("cannot start the listener: {e}")))?;
        let cause = Arc::new(Mutex::new(None));
        Ok(PartyNode { config, key, addr, arrivals, stop, arrived: Vec::new(), refusals: Vec::new(), cause })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn setup_error(&self, reason: String) -> MpcError {
        MpcError::Setup { party: self.config.id, reason }
    }

    /// Takes in what the listener reported; refusals are told to `log`.
    fn note(&mut self, arrival: Arrival, log: &mut dyn FnMut(&str)) {
        match arrival {
            Arrival::Linked(role, link, from) => self.arrived.push((role, link, from)),
            Arrival::Refused(reason) => {
                log(&reason);
                self.refusals.push(reason);
            }
        }
    }

    /// The connections refused so far, for an error that may be their consequence.
    fn refused_meanwhile(&self) -> String {
        match self.refusals.is_empty() {
            true => String::new(),
            false => format!(" (refused meanwhile: {})", self.refusals.join("; ")),
        }
    }

    fn drain(&mut self, log: &mut dyn FnMut(&str)) {
        while let Ok(a) = self.arrivals.try_recv() {
            self.note(a, log);
        }
    }

    /// The link `role` opened, waiting for it until `deadline` (`None`: for ever).
    fn wait_for(
        &mut self,
        role: Role,
        deadline: Option<Instant>,
        log: &mut dyn FnMut(&str),
    ) -> Result<(Link, SocketAddr), MpcError> {
        loop {
            if let Some(at) = self.arrived.iter().position(|(r, _, _)| *r == role) {
                let (_, link, from) = self.arrived.swap_remove(at);
                return Ok((*link, from));
            }
            let next = match deadline {
                None => self.arrivals.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(d) => self.arrivals.recv_timeout(d.saturating_duration_since(Instant::now())),
            };
            match next {
                Ok(a) => self.note(a, log),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let refused = self.refused_meanwhile();
                    return Err(self.setup_error(format!(
                        "{role} did not link within {} s: is it running, with the same --peers and --party-keys?{refused}",
                        self.config.wait.as_secs()
                    )));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(self.setup_error(format!("stopped listening before {role} linked")))
                }
            }
        }
    }

    /// Dials party `to` (trying again while it is not listening yet, until `deadline`), proves
    /// who this party is and checks who answers.
    fn dial(&mut self, to: usize, deadline: Instant, log: &mut dyn FnMut(&str)) -> Result<Link, MpcError> {
        let id = self.config.id;
        let addr = self.config.parties.addrs[to].clone();
        let pinned = LinkPolicy::Only(vec![self.config.parties.keys[to]]);
        let mut link = loop {
            match Link::connect(&addr, &purpose_to(to), &self.key, &pinned, link_options()) {
                Ok(link) => break link,
                Err(ChannelError::Io { .. }) if Instant::now() < deadline => {
                    self.drain(log);
                    std::thread::sleep(RETRY_EVERY);
                }
                Err(e) => {
                    self.drain(log);
                    let refused = self.refused_meanwhile();
                    return Err(self.setup_error(format!("cannot link to party {to} at {addr}: {e}{refused}")));
                }
            }
        };
        introduce(&mut link, &party_purpose(id, to))
            .map_err(|e| self.setup_error(format!("party {to} at {addr} did not take this party's link: {e}")))?;
        Ok(link)
    }

    /// Links with the other two parties and exchanges the pairwise keys: this party, ready for
    /// the owner.
    pub fn link_parties(&mut self, log: &mut dyn FnMut(&str)) -> Result<Party, MpcError> {
        let id = self.config.id;
        let (next, prev) = ((id + 1) % 3, (id + 2) % 3);
        let deadline = Instant::now() + self.config.wait;
        let to_next = self.dial(next, deadline, log)?;
        let to_prev = self.dial(prev, deadline, log)?;
        let (from_next, _) = self.wait_for(Role::Party(next), Some(deadline), log)?;
        let (from_prev, _) = self.wait_for(Role::Party(prev), Some(deadline), log)?;
        let names = (self.config.parties.name(next), self.config.parties.name(prev));
        let writer = |e: std::io::Error| self.setup_error(format!("cannot start a link's writer: {e}"));
        let next_link = PeerLink::new(names.0, to_next, from_next, self.cause.clone()).map_err(writer)?;
        let prev_link = PeerLink::new(names.1, to_prev, from_prev, self.cause.clone()).map_err(writer)?;
        let fp = FixedPoint::new(DEFAULT_FRAC_BITS).map_err(MpcError::Invalid)?;
        // The owner's setup brings the run's fixed-point format.
        Party::connect(id, Box::new(next_link), Box::new(prev_link), fp)
    }

    /// Waits (for ever) for the data owner's link, and tells the owner this party is ready.
    pub fn accept_owner(&mut self, log: &mut dyn FnMut(&str)) -> Result<Box<dyn Channel>, MpcError> {
        let (mut link, from) = self.wait_for(Role::Owner, None, log)?;
        self.stop.store(true, Ordering::SeqCst);
        link.send(tag::WELCOME, &[])
            .map_err(|e| self.setup_error(format!("the data owner at {from} left before the run began: {e}")))?;
        // A party that loses its owner tells its neighbours so, rather than leave them to blame it.
        Ok(Box::new(Named { link, name: format!("the data owner ({from})"), cause: Some(self.cause.clone()) }))
    }
}

impl Drop for PartyNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The listener thread: accepts until the two neighbours and the owner have linked (or `stop`),
/// each connection's handshake on a thread of its own so that a slow one holds up no other.
fn listen(
    listener: TcpListener,
    key: Arc<KeyPair>,
    config: PartyConfig,
    tx: mpsc::Sender<Arrival>,
    stop: Arc<AtomicBool>,
) {
    let taken = Arc::new(Mutex::new(Vec::<Role>::new()));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, from)) => {
                let (key, config, report, taken, stop) =
                    (key.clone(), config.clone(), tx.clone(), taken.clone(), stop.clone());
                let spawned = std::thread::Builder::new().name("cryptgpu handshake".into()).spawn(move || {
                    let arrival = match admit(stream, from, &key, &config, &taken, &stop) {
                        Ok((role, link)) => Arrival::Linked(role, Box::new(link), from),
                        Err(reason) => Arrival::Refused(reason),
                    };
                    let _ = report.send(arrival);
                });
                if let Err(e) = spawned {
                    let _ = tx.send(Arrival::Refused(format!("dropped a connection from {from}: {e}")));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(25)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(Arrival::Refused(format!("accepting a connection failed: {e}")));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Runs the handshake of one connection and checks its purpose against the key it proved.
fn admit(
    stream: TcpStream,
    from: SocketAddr,
    key: &KeyPair,
    config: &PartyConfig,
    taken: &Mutex<Vec<Role>>,
    stop: &AtomicBool,
) -> Result<(Role, Link), String> {
    let me = config.id;
    let keys = &config.parties.keys;
    let (next, prev) = ((me + 1) % 3, (me + 2) % 3);
    let refused = |e: &dyn std::fmt::Display| format!("party {me} refused a connection from {from}: {e}");
    stream.set_nonblocking(false).map_err(|e| refused(&e))?;
    let policy = LinkPolicy::Only(vec![keys[next], keys[prev], config.owner_key]);
    let mut link = Link::accept(stream, &purpose_to(me), key, &policy, link_options()).map_err(|e| match e {
        ChannelError::Refused { reason, .. } => refused(&format!(
            "{}: it is neither party {next}'s nor party {prev}'s in --party-keys, nor --owner-key",
            reason.strip_prefix("we refused it: ").unwrap_or(&reason)
        )),
        other => refused(&other),
    })?;
    let role = match link.remote_key() {
        k if k == config.owner_key => Role::Owner,
        k if k == keys[next] => Role::Party(next),
        _ => Role::Party(prev),
    };
    let expected = match role {
        Role::Owner => OWNER_PURPOSE.to_string(),
        Role::Party(p) => party_purpose(p, me),
    };
    let hello = link.recv_limited(MAX_NOTE_BYTES).map_err(|e| refused(&format!("{role} sent no purpose: {e}")))?;
    let said = printable(&hello.payload);
    let refusal = {
        let mut taken = lock(taken);
        if hello.tag != tag::HELLO {
            Some(format!("{role} sent message tag {:#x} instead of its purpose", hello.tag))
        } else if said != expected {
            Some(format!("the key of {role} asked for '{said}'; it may only ask for '{expected}'"))
        } else if taken.contains(&role) {
            Some(format!("{role} is already linked to party {me}"))
        } else {
            taken.push(role);
            if taken.len() == 3 {
                stop.store(true, Ordering::SeqCst);
            }
            None
        }
    };
    if let Some(reason) = refusal {
        let _ = link.send(tag::REFUSED, reason.as_bytes());
        return Err(refused(&reason));
    }
    // The owner is welcomed once this party is ready (`accept_owner`): its connection returns then.
    if let Role::Party(_) = role {
        link.send(tag::WELCOME, &[]).map_err(|e| refused(&e))?;
    }
    Ok((role, link))
}

/// Runs party `config.id` on `listener`: links with the other two parties, waits for the data
/// owner and serves its run until the owner stops it. Progress goes to `log` (one line when
/// ready).
pub fn run_party(
    listener: TcpListener,
    key: Arc<KeyPair>,
    config: PartyConfig,
    log: &mut dyn FnMut(&str),
) -> Result<(), MpcError> {
    let id = config.id;
    let mut node = PartyNode::start(listener, key, config.clone())?;
    let (next, prev) = ((id + 1) % 3, (id + 2) % 3);
    log(&format!(
        "cryptgpu party {id} listening on {}; linking with {} and {}",
        node.local_addr(),
        config.parties.name(next),
        config.parties.name(prev)
    ));
    let party = node.link_parties(log)?;
    log(&format!(
        "cryptgpu party {id} ready: linked with parties {next} and {prev}; waiting for the data owner (key {})",
        config.owner_key
    ));
    let mut owner = node.accept_owner(log)?;
    log(&format!("cryptgpu party {id}: serving {}", owner.peer()));
    crate::session::serve(party, owner.as_mut())
}

/// The data owner's links to the three parties (party 0, 1, 2), each pinned to its key. Every
/// party is tried, so that one that cannot be reached does not leave the others waiting: those
/// reached see their link close, and stop.
pub fn connect_parties(parties: &Parties, key: &KeyPair) -> Result<Vec<Box<dyn Channel>>, MpcError> {
    let mut links: Vec<Box<dyn Channel>> = Vec::new();
    let mut failures = Vec::new();
    for i in 0..3 {
        let addr = &parties.addrs[i];
        let pinned = LinkPolicy::Only(vec![parties.keys[i]]);
        let linked = Link::connect(addr, &purpose_to(i), key, &pinned, link_options())
            .map_err(|e| format!("cannot reach party {i} at {addr}: {e}"))
            .and_then(|mut link| {
                introduce(&mut link, OWNER_PURPOSE)
                    .map_err(|e| format!("party {i} at {addr} did not take the data owner's link: {e}"))?;
                Ok(link)
            });
        match linked {
            Ok(link) => links.push(Box::new(Named { link, name: parties.name(i), cause: None })),
            Err(e) => failures.push(e),
        }
    }
    match failures.is_empty() {
        true => Ok(links),
        false => Err(MpcError::Invalid(failures.join("; "))),
    }
}
