"""The Registry gRPC API seen from grpcio: valid requests work, invalid ones
get the right status code with the offending field named, and no rejected
request changes what ListInstances returns."""

import grpc
import pytest

from isdp.v1 import registry_pb2 as pb

SERVICE = "pyclient"
TIMEOUT_S = 10


def instance(**kw):
    fields = dict(service=SERVICE, address="127.0.0.1", port=8080)
    fields.update(kw)
    return pb.Instance(**fields)


def listed(registry, service=SERVICE):
    resp = registry.ListInstances(pb.ListInstancesRequest(service=service), timeout=TIMEOUT_S)
    return sorted((i.id, i.service, i.address, i.port) for i in resp.instances)


def rejected(registry, request, rpc="Register"):
    with pytest.raises(grpc.RpcError) as err:
        getattr(registry, rpc)(request, timeout=TIMEOUT_S)
    return err.value


@pytest.fixture(scope="module")
def baseline(registry):
    resp = registry.Register(
        pb.RegisterRequest(instance=instance(id="py-valid-1", port=9001, metadata={"zone": "a"})),
        timeout=TIMEOUT_S,
    )
    assert resp.instance.id == "py-valid-1"
    return listed(registry)


def test_register_valid_is_listed(registry, baseline):
    assert ("py-valid-1", SERVICE, "127.0.0.1", 9001) in baseline
    resp = registry.ListInstances(pb.ListInstancesRequest(service=SERVICE), timeout=TIMEOUT_S)
    inst = next(i for i in resp.instances if i.id == "py-valid-1")
    assert dict(inst.metadata) == {"zone": "a"}
    services = registry.ListServices(pb.ListServicesRequest(), timeout=TIMEOUT_S).services
    assert any(s.name == SERVICE and s.instances >= 1 for s in services)


def test_register_generates_an_id(registry, baseline):
    resp = registry.Register(pb.RegisterRequest(instance=instance(port=9002)), timeout=TIMEOUT_S)
    assert resp.instance.id, "an empty id must be generated"
    assert resp.instance.id in [i[0] for i in listed(registry)]
    registry.Deregister(pb.DeregisterRequest(id=resp.instance.id), timeout=TIMEOUT_S)
    assert listed(registry) == baseline


def test_bad_service_name_is_invalid_argument(registry, baseline):
    err = rejected(registry, pb.RegisterRequest(instance=instance(service="Bad_Name")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "instance.service" in err.details(), err.details()
    assert listed(registry) == baseline


def test_port_out_of_range_is_invalid_argument(registry, baseline):
    err = rejected(registry, pb.RegisterRequest(instance=instance(port=70000)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "instance.port" in err.details(), err.details()
    assert listed(registry) == baseline


def test_deregister_unknown_is_not_found(registry, baseline):
    err = rejected(registry, pb.DeregisterRequest(id="no-such-instance"), rpc="Deregister")
    assert err.code() == grpc.StatusCode.NOT_FOUND, err
    assert listed(registry) == baseline


def test_oversized_request_is_refused(registry, baseline, control_plane):
    huge = instance(id="py-huge", metadata={"blob": "x" * (5 * 1024 * 1024)})
    err = rejected(registry, pb.RegisterRequest(instance=huge))
    assert err.code() in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    ), err
    assert listed(registry) == baseline
    assert control_plane.proc.poll() is None, "control plane died on a 5 MB request"


@pytest.mark.parametrize("token", ["", "isdp_0123456789abcdef_bogus"])
def test_missing_or_bogus_token_is_unauthenticated(registry, baseline, control_plane, token):
    from isdp.v1 import registry_pb2_grpc

    with control_plane.channel(token=token) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        err = rejected(stub, pb.RegisterRequest(instance=instance(id="py-anon-1", port=9002)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
    assert listed(registry) == baseline
