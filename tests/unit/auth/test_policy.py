"""The policy table names every RPC of the contract, and nothing else."""

from __future__ import annotations

from jobs.v1 import jobs_pb2

from job_service.auth.policy import POLICY, Role, allowed_roles


def contract_methods() -> set[str]:
    return {
        f"/{service.full_name}/{method.name}"
        for service in jobs_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def test_every_rpc_of_the_contract_is_in_the_policy_table():
    missing = contract_methods() - set(POLICY)
    assert not missing, f"add these RPCs to job_service/auth/policy.py POLICY: {sorted(missing)}"


def test_the_policy_table_names_no_rpc_that_does_not_exist():
    stale = set(POLICY) - contract_methods()
    assert not stale, f"POLICY names RPCs jobs.proto does not have: {sorted(stale)}"


def test_every_rpc_allows_someone_and_workers_only_the_worker_service():
    for method, roles in POLICY.items():
        assert roles, method
        assert (Role.WORKER in roles) == method.startswith("/jobs.v1.WorkerService/"), method
        if method.startswith("/jobs.v1.AdminService/"):
            assert roles == {Role.OPERATOR}, method


def test_a_method_outside_the_table_is_refused_to_everybody():
    assert allowed_roles("/jobs.v1.UploadService/NoSuchMethod") == frozenset()
