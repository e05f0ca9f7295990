//! One query in, one response out: parsing with hickory-proto, the name
//! looked up in the [`Zone`], the records sampled, and the response encoded
//! within what the transport carries. Pure apart from its random source,
//! so every answer is unit-tested without a socket.

use hickory_proto::op::{Edns, Header, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};

use super::zone::{InstanceEntry, Lookup, ServiceEntry, SrvEntry, Zone};
use crate::balance::rng::Rng;

/// The largest UDP response, whatever a client's EDNS buffer says: 1232
/// bytes fit every path's MTU without fragments (DNS flag day 2020), and
/// bigger answers go over TCP.
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// What a UDP client without EDNS takes (RFC 1035).
pub const MIN_UDP_PAYLOAD: u16 = 512;
/// The largest message TCP's two-byte length prefix carries.
const MAX_TCP_MESSAGE: usize = u16::MAX as usize;
/// Size of a DNS header; anything shorter gets no answer.
const HEADER_LEN: usize = 12;

/// How the query came, and so how big the response may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The query's type, as the metric labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryType {
    A,
    Aaaa,
    Srv,
    Any,
    Other,
    /// No question was read (too short, malformed, or no single question).
    None,
}

/// What the server answered, as the metric labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rcode {
    NoError,
    FormErr,
    ServFail,
    NxDomain,
    NotImp,
    Refused,
    BadVers,
    /// No answer was sent: shorter than a header, or itself a response.
    Dropped,
}

/// What happened to one query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub qtype: QueryType,
    pub rcode: Rcode,
    /// The answer did not fit: TC set, records left out (UDP).
    pub truncated: bool,
}

/// Answers queries; one per socket or connection, its buffers reused
/// from query to query.
pub struct Responder {
    max_answers: usize,
    rng: Rng,
    /// Indices being sampled, reused.
    order: Vec<usize>,
    /// The response being built, reused.
    response: Message,
}

// === impl QueryType, Rcode ===

impl QueryType {
    pub const ALL: [QueryType; 6] = [
        QueryType::A,
        QueryType::Aaaa,
        QueryType::Srv,
        QueryType::Any,
        QueryType::Other,
        QueryType::None,
    ];

    fn of(t: RecordType) -> Self {
        match t {
            RecordType::A => QueryType::A,
            RecordType::AAAA => QueryType::Aaaa,
            RecordType::SRV => QueryType::Srv,
            RecordType::ANY => QueryType::Any,
            _ => QueryType::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QueryType::A => "A",
            QueryType::Aaaa => "AAAA",
            QueryType::Srv => "SRV",
            QueryType::Any => "ANY",
            QueryType::Other => "other",
            QueryType::None => "none",
        }
    }
}

impl Rcode {
    pub const ALL: [Rcode; 8] = [
        Rcode::NoError,
        Rcode::FormErr,
        Rcode::ServFail,
        Rcode::NxDomain,
        Rcode::NotImp,
        Rcode::Refused,
        Rcode::BadVers,
        Rcode::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rcode::NoError => "NOERROR",
            Rcode::FormErr => "FORMERR",
            Rcode::ServFail => "SERVFAIL",
            Rcode::NxDomain => "NXDOMAIN",
            Rcode::NotImp => "NOTIMP",
            Rcode::Refused => "REFUSED",
            Rcode::BadVers => "BADVERS",
            Rcode::Dropped => "none",
        }
    }

    fn code(self) -> ResponseCode {
        match self {
            Rcode::NoError | Rcode::Dropped => ResponseCode::NoError,
            Rcode::FormErr => ResponseCode::FormErr,
            Rcode::ServFail => ResponseCode::ServFail,
            Rcode::NxDomain => ResponseCode::NXDomain,
            Rcode::NotImp => ResponseCode::NotImp,
            Rcode::Refused => ResponseCode::Refused,
            Rcode::BadVers => ResponseCode::BADVERS,
        }
    }
}

// === impl Responder ===

impl Responder {
    pub fn new(max_answers: usize, seed: u64) -> Self {
        Responder {
            max_answers,
            rng: Rng::new(seed),
            order: Vec::new(),
            response: Message::response(0, OpCode::Query),
        }
    }

    /// Answers `query` from `zone` into `out` (cleared first; left empty
    /// when no answer is due).
    pub fn respond(
        &mut self,
        query: &[u8],
        zone: &Zone,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Outcome {
        out.clear();
        let dropped = Outcome {
            qtype: QueryType::None,
            rcode: Rcode::Dropped,
            truncated: false,
        };
        if query.len() < HEADER_LEN {
            return dropped;
        }
        let Ok(header) = Header::read(&mut BinDecoder::new(query)) else {
            return dropped;
        };
        // Never answer a response: two servers would echo each other.
        if header.metadata.message_type == MessageType::Response {
            return dropped;
        }
        self.reset(&header.metadata);
        let Ok(request) = Message::from_vec(query) else {
            return self.finish(QueryType::None, Rcode::FormErr, None, out);
        };
        let edns = request.edns.as_ref();
        let limit = match (transport, edns) {
            (Transport::Tcp, _) => MAX_TCP_MESSAGE,
            (Transport::Udp, None) => usize::from(MIN_UDP_PAYLOAD),
            (Transport::Udp, Some(e)) => {
                usize::from(e.max_payload().clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD))
            }
        };
        let opt = edns.map(|_| {
            let mut opt = Edns::new();
            opt.set_max_payload(MAX_UDP_PAYLOAD);
            opt
        });
        self.response.edns = opt;
        let qtype = match request.queries.as_slice() {
            [q] => QueryType::of(q.query_type()),
            _ => QueryType::None,
        };
        if request.metadata.op_code != OpCode::Query {
            return self.finish(qtype, Rcode::NotImp, Some(limit), out);
        }
        let [question] = request.queries.as_slice() else {
            return self.finish(qtype, Rcode::FormErr, Some(limit), out);
        };
        self.response.queries.push(question.clone());
        if edns.is_some_and(|e| e.version() > 0) {
            return self.finish(qtype, Rcode::BadVers, Some(limit), out);
        }
        if question.query_class() != DNSClass::IN {
            return self.finish(qtype, Rcode::Refused, Some(limit), out);
        }
        let rcode = match zone.lookup(question.name()) {
            Lookup::Outside => Rcode::Refused,
            Lookup::NoSuchName => Rcode::NxDomain,
            Lookup::Empty => Rcode::NoError,
            Lookup::Service(ServiceEntry::Pending) => Rcode::ServFail,
            Lookup::Service(ServiceEntry::Known { v4, v6, srvs }) => {
                match question.query_type() {
                    RecordType::A => self.sample(v4),
                    RecordType::AAAA => self.sample(v6),
                    RecordType::ANY => {
                        self.sample(v4);
                        self.sample(v6);
                    }
                    RecordType::SRV => self.sample_srv(srvs),
                    _ => {}
                }
                Rcode::NoError
            }
            Lookup::Instance(entry) => {
                self.instance(entry, question.query_type());
                Rcode::NoError
            }
        };
        self.response.metadata.authoritative = rcode != Rcode::Refused;
        self.finish(qtype, rcode, Some(limit), out)
    }

    /// An empty response to `request`'s header: its id, opcode and RD.
    fn reset(&mut self, request: &Metadata) {
        let r = &mut self.response;
        r.metadata = Metadata::response_from_request(request);
        r.queries.clear();
        r.answers.clear();
        r.authorities.clear();
        r.additionals.clear();
        r.edns = None;
        r.signature = None;
    }

    /// Up to `max_answers` of `records` (the rest of the budget when some
    /// are in already), in random order.
    fn sample(&mut self, records: &[Record]) {
        let room = self.max_answers.saturating_sub(self.response.answers.len());
        let k = self.pick(records.len(), room);
        for &i in &self.order[..k] {
            self.response.answers.push(records[i].clone());
        }
    }

    /// Up to `max_answers` SRV records in random order, their targets'
    /// addresses in the additional section.
    fn sample_srv(&mut self, srvs: &[SrvEntry]) {
        let k = self.pick(srvs.len(), self.max_answers);
        for &i in &self.order[..k] {
            self.response.answers.push(srvs[i].srv.clone());
            self.response.additionals.push(srvs[i].address.clone());
        }
    }

    fn instance(&mut self, entry: &InstanceEntry, qtype: RecordType) {
        let r = &mut self.response;
        if qtype == RecordType::SRV {
            r.answers.push(entry.srv.clone());
            r.additionals.push(entry.address.clone());
        } else if qtype == RecordType::ANY || qtype == entry.address.record_type() {
            r.answers.push(entry.address.clone());
        }
    }

    /// Puts `k` distinct indices below `n` (all of them when `n <= k`) in
    /// random order at the front of `order` (a partial Fisher-Yates
    /// shuffle over a reused vector), and returns how many.
    fn pick(&mut self, n: usize, k: usize) -> usize {
        self.order.clear();
        self.order.extend(0..n);
        let k = k.min(n);
        for i in 0..k {
            let j = i + self.rng.below(n - i);
            self.order.swap(i, j);
        }
        k
    }

    /// Encodes the response within `limit` (None: a bare header, for a
    /// message that could not be read). When it does not fit, the
    /// records are left out and TC set, so the client retries over TCP.
    fn finish(
        &mut self,
        qtype: QueryType,
        rcode: Rcode,
        limit: Option<usize>,
        out: &mut Vec<u8>,
    ) -> Outcome {
        self.response.metadata.response_code = rcode.code();
        let limit = limit.unwrap_or(MAX_TCP_MESSAGE);
        let mut truncated = false;
        if encode(&self.response, out).is_err() || out.len() > limit {
            truncated = true;
            self.response.answers.clear();
            self.response.additionals.clear();
            self.response.metadata.truncation = true;
            if encode(&self.response, out).is_err() {
                out.clear();
                return Outcome {
                    qtype,
                    rcode: Rcode::Dropped,
                    truncated,
                };
            }
        }
        Outcome {
            qtype,
            rcode,
            truncated,
        }
    }
}

fn encode(message: &Message, out: &mut Vec<u8>) -> Result<(), hickory_proto::ProtoError> {
    out.clear();
    let mut encoder = BinEncoder::new(out);
    message.emit(&mut encoder)
}
