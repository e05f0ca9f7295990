//! Name parsing and answer building, on a zone built from a hand-made
//! snapshot and queries encoded by hickory-proto.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use isdp_core::probe::Health;

use super::*;
use crate::xds::{Endpoint, Resources, UpstreamState};

fn endpoint(id: &str, address: &str, port: u16, health: Health) -> Endpoint {
    Endpoint {
        id: id.to_owned(),
        address: address.to_owned(),
        port,
        inbound_port: 15006,
        weight: 1,
        operator_weight: 1,
        weight_reason: String::new(),
        metadata: BTreeMap::new(),
        health,
        zone: String::new(),
        priority: 0,
    }
}

fn resources() -> Resources {
    let mut r = Resources::new();
    r.insert(
        "payments".into(),
        UpstreamState {
            exists: true,
            version: "1".into(),
            endpoints: vec![
                endpoint("n1.payments", "127.0.0.1", 8081, Health::Healthy),
                endpoint("n2.payments", "127.0.0.2", 8082, Health::Unknown),
                endpoint("n3.payments", "127.0.0.3", 8083, Health::Unhealthy),
                endpoint("n4.payments", "::1", 8084, Health::Healthy),
                Endpoint {
                    priority: 2,
                    ..endpoint("n5.payments", "127.0.0.5", 8085, Health::Healthy)
                },
            ],
        },
    );
    r.insert(
        "many".into(),
        UpstreamState {
            exists: true,
            version: "1".into(),
            endpoints: (0..60)
                .map(|i| {
                    endpoint(
                        &format!("n{i}.many"),
                        &format!("10.0.0.{i}"),
                        80,
                        Health::Healthy,
                    )
                })
                .collect(),
        },
    );
    r.insert(
        "down".into(),
        UpstreamState {
            exists: true,
            version: "1".into(),
            endpoints: vec![endpoint("n1.down", "127.0.0.9", 80, Health::Unhealthy)],
        },
    );
    r.insert("gone".into(), UpstreamState::default());
    r
}

fn zone() -> Zone {
    Zone::build(
        "isdp",
        5,
        ["payments", "many", "down", "gone", "pending"],
        &resources(),
    )
}

fn query(name: &str, t: RecordType) -> Message {
    let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m
}

fn ask(m: &Message, transport: Transport, max_answers: usize) -> (Outcome, Option<Message>) {
    let mut out = Vec::new();
    let outcome =
        Responder::new(max_answers, 7).respond(&m.to_vec().unwrap(), &zone(), transport, &mut out);
    let reply = (!out.is_empty()).then(|| Message::from_vec(&out).unwrap());
    (outcome, reply)
}

fn answer(name: &str, t: RecordType) -> Message {
    let (_, reply) = ask(&query(name, t), Transport::Tcp, 8);
    reply.expect("an answer")
}

fn ips(m: &Message) -> BTreeSet<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_answers_the_routable_instances_only() {
    let m = answer("payments.service.isdp.", RecordType::A);
    assert_eq!(m.metadata.id, 4242);
    // n1 and n2 (unknown health, still routable): n3 is down, and n5 a
    // standby at priority 2 while priority 0 has instances.
    assert_eq!(m.answers.len(), 2);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative && m.metadata.recursion_desired);
    assert!(!m.metadata.recursion_available);
    assert_eq!(ips(&m), [ip("127.0.0.1"), ip("127.0.0.2")].into());
    assert!(m.answers.iter().all(|r| r.ttl == 5));
    assert_eq!(m.queries.len(), 1);
    let m = answer("payments.service.isdp.", RecordType::AAAA);
    assert_eq!(ips(&m), [ip("::1")].into());
}

/// Address records come from the best level left in their family, as
/// the sidecars fail over; instances on one address share a record.
#[test]
fn a_answers_fall_back_to_standbys_only_when_the_level_above_is_down() {
    let ep = |id: &str, address: &str, health, priority| Endpoint {
        priority,
        ..endpoint(id, address, 80, health)
    };
    let zone_of = |endpoints| {
        let mut r = Resources::new();
        r.insert(
            "db".into(),
            UpstreamState {
                exists: true,
                version: "1".into(),
                endpoints,
            },
        );
        Zone::build("isdp", 5, ["db"], &r)
    };
    let a = |zone: &Zone, t| {
        let mut out = Vec::new();
        let question = query("db.service.isdp.", t).to_vec().unwrap();
        Responder::new(16, 7).respond(&question, zone, Transport::Tcp, &mut out);
        ips(&Message::from_vec(&out).unwrap())
    };
    let zone = zone_of(vec![
        ep("p0", "10.0.0.1", Health::Unhealthy, 0),
        ep("p3", "10.0.0.3", Health::Healthy, 3),
        ep("p3b", "10.0.0.3", Health::Unknown, 3),
        ep("p5", "10.0.0.5", Health::Healthy, 5),
        // The only IPv6 instance: the AAAA answer's best level is its own.
        ep("v6", "::5", Health::Healthy, 5),
    ]);
    assert_eq!(a(&zone, RecordType::A), [ip("10.0.0.3")].into());
    assert_eq!(a(&zone, RecordType::AAAA), [ip("::5")].into());
    // Back at priority 0, the standbys leave the answer.
    let zone = zone_of(vec![
        ep("p5", "10.0.0.5", Health::Healthy, 5),
        ep("p3", "10.0.0.3", Health::Healthy, 3),
        ep("p0", "10.0.0.1", Health::Healthy, 0),
    ]);
    assert_eq!(a(&zone, RecordType::A), [ip("10.0.0.1")].into());
}

#[test]
fn names_are_matched_whatever_their_case() {
    let m = answer("PayMents.SERVICE.Isdp.", RecordType::A);
    assert_eq!(ips(&m).len(), 2);
    let m = answer("N1.Payments.INSTANCE.isdp.", RecordType::A);
    assert_eq!(ips(&m), [ip("127.0.0.1")].into());
}

#[test]
fn srv_points_at_instance_names_with_their_addresses() {
    let m = answer("payments.service.isdp.", RecordType::SRV);
    let mut targets: Vec<(String, u16, u16)> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => (s.target.to_string(), s.port, s.priority),
            other => panic!("not SRV: {other:?}"),
        })
        .collect();
    targets.sort();
    // Each with its instance's priority.
    assert_eq!(
        targets,
        [
            ("n1.payments.instance.isdp.".to_owned(), 8081, 0),
            ("n2.payments.instance.isdp.".to_owned(), 8082, 0),
            ("n4.payments.instance.isdp.".to_owned(), 8084, 0),
            ("n5.payments.instance.isdp.".to_owned(), 8085, 2),
        ]
    );
    let additional: BTreeSet<String> = m.additionals.iter().map(|r| r.name.to_string()).collect();
    assert_eq!(additional.len(), 4);
    for (target, _, _) in &targets {
        assert!(additional.contains(target), "{target} has no address");
    }
    // The target resolves on its own, too.
    let m = answer("n4.payments.instance.isdp.", RecordType::AAAA);
    assert_eq!(ips(&m), [ip("::1")].into());
    let m = answer("n1.payments.instance.isdp.", RecordType::SRV);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.additionals.len(), 1);
}

#[test]
fn answers_are_capped_and_sampled_at_random() {
    let mut seen = BTreeSet::new();
    let mut orders = BTreeSet::new();
    let mut responder = Responder::new(3, 1);
    let q = query("many.service.isdp.", RecordType::A).to_vec().unwrap();
    let zone = zone();
    for _ in 0..200 {
        let mut out = Vec::new();
        responder.respond(&q, &zone, Transport::Udp, &mut out);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.answers.len(), 3);
        let order: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
        seen.extend(order.iter().cloned());
        orders.insert(order);
    }
    assert!(
        seen.len() > 50,
        "only {} of 60 instances ever answered",
        seen.len()
    );
    assert!(orders.len() > 100);
}

#[test]
fn rcodes_for_names_that_are_not_instances() {
    let rcode = |name: &str| {
        let (outcome, reply) = ask(&query(name, RecordType::A), Transport::Udp, 8);
        (outcome.rcode, reply.unwrap().metadata.response_code)
    };
    assert_eq!(
        rcode("nope.service.isdp."),
        (Rcode::NxDomain, ResponseCode::NXDomain)
    );
    assert_eq!(
        rcode("gone.service.isdp."),
        (Rcode::NxDomain, ResponseCode::NXDomain)
    );
    assert_eq!(
        rcode("x.instance.isdp."),
        (Rcode::NxDomain, ResponseCode::NXDomain)
    );
    assert_eq!(
        rcode("a.b.service.isdp."),
        (Rcode::NxDomain, ResponseCode::NXDomain)
    );
    assert_eq!(
        rcode("payments.isdp."),
        (Rcode::NxDomain, ResponseCode::NXDomain)
    );
    // Names that exist and hold no record of the type.
    assert_eq!(rcode("isdp."), (Rcode::NoError, ResponseCode::NoError));
    assert_eq!(
        rcode("service.isdp."),
        (Rcode::NoError, ResponseCode::NoError)
    );
    assert_eq!(
        rcode("down.service.isdp."),
        (Rcode::NoError, ResponseCode::NoError)
    );
    assert!(
        answer("down.service.isdp.", RecordType::A)
            .answers
            .is_empty()
    );
    assert!(
        answer("payments.service.isdp.", RecordType::TXT)
            .answers
            .is_empty()
    );
    // Followed, but not answered yet.
    assert_eq!(
        rcode("pending.service.isdp."),
        (Rcode::ServFail, ResponseCode::ServFail)
    );
    // No recursion.
    assert_eq!(
        rcode("example.com."),
        (Rcode::Refused, ResponseCode::Refused)
    );
    assert_eq!(
        rcode("isdp.example."),
        (Rcode::Refused, ResponseCode::Refused)
    );
    let mut chaos = query("payments.service.isdp.", RecordType::A);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(ask(&chaos, Transport::Udp, 8).0.rcode, Rcode::Refused);
}

#[test]
fn malformed_queries_get_formerr_or_nothing() {
    let zone = zone();
    let mut responder = Responder::new(8, 1);
    let mut out = Vec::new();
    let mut respond = |bytes: &[u8]| {
        let outcome = responder.respond(bytes, &zone, Transport::Udp, &mut out);
        (outcome.rcode, (!out.is_empty()).then(|| out.clone()))
    };
    // Shorter than a header: nothing to answer to.
    assert_eq!(respond(&[0x12, 0x34, 0x01]), (Rcode::Dropped, None));
    assert_eq!(respond(&[]), (Rcode::Dropped, None));
    // Garbage after a header.
    let (rcode, reply) = respond(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff\xff");
    assert_eq!(rcode, Rcode::FormErr);
    let reply = Message::from_vec(&reply.unwrap()).unwrap();
    assert_eq!(
        (reply.metadata.id, reply.metadata.response_code),
        (0x1234, ResponseCode::FormErr)
    );
    // No question, two questions.
    let mut none = query("payments.service.isdp.", RecordType::A);
    none.queries.clear();
    assert_eq!(respond(&none.to_vec().unwrap()).0, Rcode::FormErr);
    let mut two = query("payments.service.isdp.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("x.isdp.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(respond(&two.to_vec().unwrap()).0, Rcode::FormErr);
    // A header that promises two questions and carries one.
    let mut lying = query("payments.service.isdp.", RecordType::A)
        .to_vec()
        .unwrap();
    lying[5] = 2;
    assert_eq!(respond(&lying).0, Rcode::FormErr);
    // A response is never answered; another opcode is not implemented.
    let mut response = query("payments.service.isdp.", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    assert_eq!(respond(&response.to_vec().unwrap()), (Rcode::Dropped, None));
    let mut notify = query("payments.service.isdp.", RecordType::A);
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(respond(&notify.to_vec().unwrap()).0, Rcode::NotImp);
}

#[test]
fn a_udp_answer_that_does_not_fit_is_truncated_for_tcp() {
    let q = query("many.service.isdp.", RecordType::SRV);
    // 60 SRV records with their addresses: over 512 bytes, and over 1232.
    let (outcome, reply) = ask(&q, Transport::Udp, 60);
    let reply = reply.unwrap();
    assert!(outcome.truncated && reply.metadata.truncation);
    assert!(reply.answers.is_empty());
    assert_eq!(reply.queries.len(), 1);
    let (outcome, reply) = ask(&q, Transport::Tcp, 60);
    assert!(!outcome.truncated);
    assert_eq!(reply.unwrap().answers.len(), 60);
    // A answers: 60 x 16 bytes do not fit 512, do fit EDNS's 1232.
    let q = query("many.service.isdp.", RecordType::A);
    assert!(ask(&q, Transport::Udp, 60).0.truncated);
    let mut with_edns = q.clone();
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    with_edns.set_edns(edns);
    let (outcome, reply) = ask(&with_edns, Transport::Udp, 60);
    let reply = reply.unwrap();
    assert!(!outcome.truncated);
    assert_eq!(reply.answers.len(), 60);
    // The server says what it takes: 1232, not the client's 4096.
    assert_eq!(reply.edns.unwrap().max_payload(), MAX_UDP_PAYLOAD);
}

#[test]
fn an_unknown_edns_version_is_badvers() {
    let mut q = query("payments.service.isdp.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_version(1);
    q.set_edns(edns);
    let (outcome, reply) = ask(&q, Transport::Udp, 8);
    assert_eq!(outcome.rcode, Rcode::BadVers);
    // 16 on the wire (hickory reads it back as BADSIG, which shares it).
    assert_eq!(u16::from(reply.unwrap().metadata.response_code), 16);
}

#[test]
fn instance_ids_that_spell_no_name_still_answer_by_service() {
    let mut r = Resources::new();
    let long = "x".repeat(100);
    r.insert(
        "svc".into(),
        UpstreamState {
            exists: true,
            version: "1".into(),
            endpoints: vec![endpoint(&long, "127.0.0.1", 80, Health::Healthy)],
        },
    );
    let zone = Zone::build("mesh.example", 0, ["svc"], &r);
    let mut out = Vec::new();
    let q = query("svc.service.mesh.example.", RecordType::A)
        .to_vec()
        .unwrap();
    Responder::new(8, 1).respond(&q, &zone, Transport::Udp, &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(ips(&m), [ip("127.0.0.1")].into());
    assert_eq!(m.answers[0].ttl, 0);
    let q = query("svc.service.mesh.example.", RecordType::SRV)
        .to_vec()
        .unwrap();
    Responder::new(8, 1).respond(&q, &zone, Transport::Udp, &mut out);
    assert!(Message::from_vec(&out).unwrap().answers.is_empty());
}
