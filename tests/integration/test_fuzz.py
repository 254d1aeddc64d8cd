"""Fuzzing every RPC of a real in-process job-service, grpc.health.v1.Health included:
thousands of generated requests (NUL, huge and exotic strings, integers at their extremes,
unknown enum values, out-of-range durations, deep, huge and non-JSON Structs) and raw garbage
bytes sent through a generic channel call. Not one answer may be INTERNAL or UNKNOWN (those
are our bugs), and the server must still be SERVING at the end.

Requests are built from the service descriptors, so an RPC or field added to jobs.proto is
fuzzed without touching this file. The generator is seeded: a failure names its seed and is
reproduced by running again with JOBS_FUZZ_SEED=<seed>.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor, duration_pb2, message_factory, struct_pb2
from grpc_health.v1 import health_pb2
from jobs.v1 import jobs_pb2 as pb

from tests.support.flows import claim, initiate, queued_job

SEED = int(os.environ.get("JOBS_FUZZ_SEED", "20261201"))
CALLS_PER_RPC = 220
RAW_CALLS_PER_RPC = 40
CONCURRENCY = 24
CALL_TIMEOUT = 3.0
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SERVICES = ("UploadService", "WorkerService", "AdminService")

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UNICODE = "aé中文🎬\u200b\u202e\u0301\ufeff\U0010fffd"


class Gen:
    def __init__(self, rng: random.Random, job_ids: list[str], tokens: list[str]) -> None:
        self.rng = rng
        self.job_ids = job_ids
        self.tokens = tokens

    # ------------------------------------------------------------------------------- scalars
    def string(self, name: str) -> str:
        r = self.rng
        known = self.job_ids + self.tokens
        choices: list[Callable[[], str]] = [
            lambda: "",
            lambda: str(uuid.uuid4()),
            lambda: r.choice(known),
            lambda: r.choice(known) + "\x00",
            lambda: "\x00" * r.randint(1, 5),
            lambda: f"  {r.choice(known)}  ",
            lambda: "".join(r.choice(UNICODE) for _ in range(r.randint(1, 300))),
            lambda: "".join(chr(r.randint(1, 31)) for _ in range(r.randint(1, 20))),
            lambda: "x" * r.choice((199, 200, 201, 255, 256, 4000, 4001, 70_000)),
            lambda: r.choice(("video/mp4", "VIDEO/MP4", "video/", "image/png", "a.mp4")),
            lambda: r.choice(("INVALID_MEDIA", "lower_case", "A" * 65, "CANCELLED")),
            lambda: r.choice(("s3://videos/results/x/", "w-1", "host-1234", "{" + "}")),
            lambda: "urn:uuid:" + str(uuid.uuid4()),
            lambda: str(uuid.uuid4()).replace("-", "_"),
            lambda: "".join(chr(r.randint(0x20, 0xD7FF)) for _ in range(r.randint(1, 64))),
        ]
        if name == "page_token":
            choices += [lambda: "AAAA" * r.randint(1, 20), lambda: "!!!", lambda: "=" * 8]
        if r.random() < 0.004:
            return "y" * r.choice((300_000, 5 * 1024 * 1024))  # above 4 MiB: RESOURCE_EXHAUSTED
        return r.choice(choices)()

    def integer(self, bits: int) -> int:
        lo, hi = INT32 if bits == 32 else INT64
        r = self.rng
        edges = (lo, hi, 0, 1, -1, 32, 33, 50, 100, 101, 500, 501, 1000, 1001)
        if bits == 64:
            edges += (5 * 1024**3, 5 * 1024**3 + 1, 2**31, -(2**31) - 1)
        return r.choice((*edges, r.randint(lo, hi), r.randint(-1000, 1000)))

    def enum(self, desc: descriptor.EnumDescriptor) -> int:
        r = self.rng
        if r.random() < 0.6:
            return r.choice([v.number for v in desc.values])
        return r.choice((-1, 99, INT32[0], INT32[1], len(desc.values)))

    def duration(self) -> duration_pb2.Duration:
        r = self.rng
        seconds = r.choice((0, 1, -1, 5, 3600, 315_576_000_000, -315_576_000_000, *INT64))
        nanos = r.choice((0, 1, 999_999_999, -999_999_999, *INT32, 500_000_000))
        return duration_pb2.Duration(seconds=seconds, nanos=nanos)

    # ------------------------------------------------------------------------------- Structs
    def _value(self, depth: int, out: struct_pb2.Value) -> None:
        r = self.rng
        pick = r.random()
        if depth > 1 and pick < 0.45:
            self._fill(out.struct_value, depth - 1)
        elif depth > 1 and pick < 0.6:
            lst = out.list_value
            for _ in range(r.randint(1, 3)):
                self._value(depth - 1, lst.values.add())
        elif pick < 0.7:
            out.number_value = r.choice(
                (float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 5e-324, 42.0)
            )
        elif pick < 0.85:
            out.string_value = self.string("value")[:2000]
        elif pick < 0.9:
            out.bool_value = True
        elif pick < 0.95:
            out.null_value = struct_pb2.NULL_VALUE
        # else: a Value with no kind set (not JSON)

    def _fill(self, s: struct_pb2.Struct, depth: int) -> None:
        for _ in range(self.rng.randint(1, 2)):
            key = self.string("key")[:100]
            self._value(depth, s.fields[key])

    def struct(self) -> struct_pb2.Struct:
        r = self.rng
        s = struct_pb2.Struct()
        kind = r.random()
        if kind < 0.35:  # deep: within the limit, just past it, past protobuf's 100
            depth = r.choice((2, 31, 32, 33, 34, 49, 50, 99, 100, 101, 150, 400))
            cur = s
            for _ in range(depth - 1):
                cur = cur.fields["a"].struct_value
            cur.fields["leaf"].number_value = 1
        elif kind < 0.45:  # large
            s.fields["blob"].string_value = "z" * r.choice((1000, 262_000, 262_145, 600_000))
        elif kind < 0.5:  # wide
            for i in range(r.choice((100, 5000, 30_000))):
                s.fields[f"k{i}"].number_value = i
        else:
            self._fill(s, r.randint(1, 6))
        return s

    # ------------------------------------------------------------------------------ messages
    def message(self, cls: Any) -> Any:
        msg = cls()
        for field in cls.DESCRIPTOR.fields:
            if self.rng.random() < 0.15:
                continue  # leave it unset
            if field.is_repeated:
                for _ in range(self.rng.choice((0, 1, 2, 3, 50, 1001))):
                    self._append(msg, field)
            else:
                self._set(msg, field)
        return msg

    def _scalar(self, field: descriptor.FieldDescriptor) -> Any:
        t = field.type
        fd = descriptor.FieldDescriptor
        if t == fd.TYPE_STRING:
            return self.string(field.name)
        if t in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32):
            return self.integer(32)
        if t in (fd.TYPE_INT64, fd.TYPE_SINT64, fd.TYPE_SFIXED64):
            return self.integer(64)
        if t == fd.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t == fd.TYPE_ENUM:
            return self.enum(field.enum_type)
        if t == fd.TYPE_BYTES:  # digests (sha256): empty, one short, exact, one long, random
            size = self.rng.choice([0, 31, 32, 33, self.rng.randrange(0, 300)])
            return self.rng.randbytes(size)
        raise AssertionError(f"no generator for {field.full_name} (type {t})")

    def _sub(self, field: descriptor.FieldDescriptor) -> Any:
        name = field.message_type.full_name
        if name == "google.protobuf.Duration":
            return self.duration()
        if name == "google.protobuf.Struct":
            return self.struct()
        return self.message(message_class(field.message_type))

    def _set(self, msg: Any, field: descriptor.FieldDescriptor) -> None:
        if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, field.name).CopyFrom(self._sub(field))
        else:
            setattr(msg, field.name, self._scalar(field))

    def _append(self, msg: Any, field: descriptor.FieldDescriptor) -> None:
        if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, field.name).add().CopyFrom(self._sub(field))
        else:
            getattr(msg, field.name).append(self._scalar(field))

    def plausible(self, cls: Any) -> Any:
        """A request that would pass validation, to mutate one field of: reaches the use
        cases and the database instead of stopping at the first check."""
        r = self.rng
        msg = cls()
        small = struct_pb2.Struct()
        small.update({"frames": 10, "codec": "h264", "tags": ["a", {"b": None}]})
        values: dict[str, Callable[[], Any]] = {
            "job_id": lambda: r.choice(self.job_ids),
            "lease_token": lambda: r.choice(self.tokens),
            "worker_id": lambda: "w-fuzz",
            "filename": lambda: "a.mp4",
            "content_type": lambda: "video/mp4",
            "size_bytes": lambda: 1000,
            "request_id": lambda: str(uuid.uuid4()),
            "max_jobs": lambda: 1,
            "progress_pct": lambda: r.randint(0, 100),
            "results_uri": lambda: "s3://videos/results/x/",
            "error_code": lambda: "INVALID_MEDIA",
            "error_message": lambda: "bad media",
            "reason": lambda: "fuzz",
            "page_size": lambda: 10,
        }
        for field in cls.DESCRIPTOR.fields:
            if field.name in values:
                setattr(msg, field.name, values[field.name]())
            elif field.type == descriptor.FieldDescriptor.TYPE_ENUM and not field.is_repeated:
                setattr(msg, field.name, r.choice([v.number for v in field.enum_type.values]))
            elif field.name == "result":
                msg.result.CopyFrom(small)
            elif field.name in ("older_than", "stuck_after") or field.name.endswith("_age"):
                getattr(msg, field.name).CopyFrom(duration_pb2.Duration(seconds=7 * 86400))
            elif field.name == "wait":
                msg.wait.CopyFrom(duration_pb2.Duration(nanos=100_000_000))
            elif field.name == "leases":
                msg.leases.add(job_id=r.choice(self.job_ids), lease_token=r.choice(self.tokens))
            elif field.name == "dry_run":
                msg.dry_run = True
        return msg

    def mutated(self, cls: Any) -> Any:
        msg = self.plausible(cls)
        fields = list(cls.DESCRIPTOR.fields)
        if fields:
            for field in self.rng.sample(fields, k=min(len(fields), self.rng.choice((1, 1, 2)))):
                msg.ClearField(field.name)
                if field.is_repeated:
                    for _ in range(self.rng.choice((1, 2, 50))):
                        self._append(msg, field)
                else:
                    self._set(msg, field)
        return msg

    # --------------------------------------------------------------------------------- bytes
    def garbage(self, valid: bytes) -> bytes:
        r = self.rng
        pick = r.random()
        if pick < 0.25:
            return r.randbytes(r.randint(1, 2000))
        if pick < 0.4 and valid:
            return valid[: r.randint(1, max(len(valid) - 1, 1))]  # truncated
        if pick < 0.55:
            return b"\x0a" + bytes([r.randint(1, 100)]) + b"\xff\xfe\xfd" * 40  # bad UTF-8
        if pick < 0.7:
            return deep_struct_bytes(r.choice((101, 200, 5000)))
        if pick < 0.8:
            return b"\x0a\xff\xff\xff\xff\x0f"  # a length far past the end
        if pick < 0.9 and valid:
            flipped = bytearray(valid)
            for _ in range(r.randint(1, 8)):
                flipped[r.randrange(len(flipped))] = r.randint(0, 255)
            return bytes(flipped)
        return b""


def deep_struct_bytes(depth: int) -> bytes:
    """Field 3 (CompleteJobRequest.result, ReportProgress uses 5) holding a Struct nested
    `depth` deep, encoded by hand so nothing on the client side refuses to build it."""

    def ld(tag: int, payload: bytes) -> bytes:
        return bytes([tag]) + varint(len(payload)) + payload

    inner = b""
    for _ in range(depth):
        value = ld(0x2A, inner)  # Value.struct_value = 5
        entry = ld(0x0A, b"a") + ld(0x12, value)  # key = 1, value = 2
        inner = ld(0x0A, entry)  # Struct.fields = 1
    return ld(0x1A, inner) + ld(0x2A, inner)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def methods() -> list[tuple[str, descriptor.MethodDescriptor]]:
    services = [pb.DESCRIPTOR.services_by_name[name] for name in SERVICES]
    services.append(health_pb2.DESCRIPTOR.services_by_name["Health"])
    return [(f"/{svc.full_name}/{m.name}", m) for svc in services for m in svc.methods]


def message_class(desc: descriptor.Descriptor) -> Any:
    return message_factory.GetMessageClass(desc)


async def call_once(
    channel: grpc.aio.Channel, path: str, method: descriptor.MethodDescriptor, body: bytes
) -> grpc.StatusCode:
    """One call with raw request bytes; the status the server answered."""
    try:
        if method.server_streaming:
            call = channel.unary_stream(path)(body, timeout=CALL_TIMEOUT)
            async for _ in call:
                call.cancel()  # the first message is the answer; a live job streams on
                return grpc.StatusCode.OK
            return grpc.StatusCode.OK
        await channel.unary_unary(path)(body, timeout=CALL_TIMEOUT)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        if err.code() in FORBIDDEN:
            print(f"\n{err.code().name} from {path}: {err.details()}\n  body[:200]={body[:200]!r}")
        return err.code()


async def test_fuzz_every_rpc_never_answers_internal_or_unknown(api, app, moto_s3):
    # Real objects for the generator to hit: jobs awaiting upload, queued, and a live lease.
    job_ids = [(await initiate(api)).job.job_id for _ in range(3)]
    job_ids += [(await queued_job(api, moto_s3)).job_id for _ in range(3)]
    tokens = [lease.lease_token for lease in await claim(api, max_jobs=2)]

    rng = random.Random(SEED)
    gen = Gen(rng, job_ids, tokens)
    plan: list[tuple[str, descriptor.MethodDescriptor, bytes]] = []
    for path, method in methods():
        cls = message_class(method.input_type)
        for i in range(CALLS_PER_RPC):
            msg = gen.mutated(cls) if i % 2 else gen.message(cls)
            plan.append((path, method, msg.SerializeToString()))
        valid = gen.message(cls).SerializeToString()
        for _ in range(RAW_CALLS_PER_RPC):
            plan.append((path, method, gen.garbage(valid)))
    rng.shuffle(plan)

    seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def run(path: str, method: descriptor.MethodDescriptor, body: bytes) -> None:
        async with gate:
            code = await call_once(api.channel, path, method, body)
        seen[path][code.name] += 1

    start = time.monotonic()
    await asyncio.gather(*(run(*item) for item in plan))
    elapsed = time.monotonic() - start

    print(f"\nfuzz: seed {SEED}, {len(plan)} calls in {elapsed:.1f} s")
    for path, _ in methods():
        counts = ", ".join(f"{k} {v}" for k, v in sorted(seen[path].items()))
        print(f"  {path}: {sum(seen[path].values())} calls: {counts}")
    bad = {
        path: {k: v for k, v in counts.items() if k in {c.name for c in FORBIDDEN}}
        for path, counts in seen.items()
    }
    assert not any(bad.values()), f"seed {SEED}: {bad}"
    assert set(seen) == {path for path, _ in methods()}  # every RPC was called
    assert all(sum(c.values()) == CALLS_PER_RPC + RAW_CALLS_PER_RPC for c in seen.values())
    # Most generated requests are wrong on purpose; they must be told so.
    assert sum(c["INVALID_ARGUMENT"] for c in seen.values()) > len(plan) // 3

    health = await api.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stats = await api.admin.GetStats(pb.GetStatsRequest(), timeout=5)
    assert sum(c.count for c in stats.counts) >= len(job_ids)
