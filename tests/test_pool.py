"""TVM's thread pool in pruneaug's processes: as many threads as the cost model times kernels with."""
from __future__ import annotations

import json
import os

import pytest
from fresh_python import run_python
from pruneaug.pool import physical_cores

REPORT = """
import json, tvm
{before}
import pruneaug
from pruneaug.cost_model import CostModel
from pruneaug.cost_model.measured import host_threads
from pruneaug.pool import physical_cores
print(json.dumps({{"pool": tvm.get_global_func("runtime.NumThreads")(), "host_threads": host_threads(),
                  "cores": CostModel("x86").target.cores, "physical": physical_cores()}}))
"""


def _report(before: str = "", **env: str) -> dict:
    """What a fresh process's TVM pool holds and what the cost model counts on, with `env` set (and
    TVM_NUM_THREADS unset unless `env` names it), `before` run before pruneaug is imported."""
    environment = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"} | env
    return json.loads(run_python(REPORT.format(before=before), env=environment))


def test_importing_pruneaug_sizes_the_pool_to_the_physical_cores():
    # TVM alone sizes it to half the hardware threads on x86: one thread on a 2-vCPU VM with one
    # thread per core, where kernels built parallel for two cores then ran on one
    report = _report()
    assert report["pool"] == report["host_threads"] == report["cores"] == report["physical"] == physical_cores()


def test_tvm_num_threads_set_by_the_user_wins():
    report = _report(TVM_NUM_THREADS="1")
    assert report["pool"] == report["host_threads"] == report["cores"] == 1


def test_a_pool_started_before_pruneaug_is_what_the_cost_model_counts_on():
    report = _report(before='tvm.get_global_func("runtime.NumThreads")()')
    assert report["host_threads"] == report["cores"] == report["pool"]


def test_physical_cores_count_hyper_threads_of_one_core_once(tmp_path):
    for cpu, siblings in {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3", 4: "4"}.items():
        folder = tmp_path / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "thread_siblings_list").write_text(siblings + "\n")
    assert physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert physical_cores({0, 2, 4}, tmp_path) == 2
    assert physical_cores({0, 1, 7}, tmp_path) == 3  # cpu7's topology is unreadable: every CPU counts


AFFINITY = """
import glob, json, tvm
{before}
tvm.get_global_func("runtime.config_threadpool")(1, 0)  # (re)starts the pool, binding its threads as told
allowed = set()
for status in glob.glob("/proc/self/task/*/status"):
    allowed |= {{line.split()[1] for line in open(status) if line.startswith("Cpus_allowed_list")}}
print(json.dumps(sorted(allowed)))
"""


def _thread_cpus(before: str, **env: str) -> list[str]:
    environment = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"} | {"TVM_NUM_THREADS": "2"} | env
    return json.loads(run_python(AFFINITY.format(before=before), env=environment))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to pin a thread away from")
def test_importing_pruneaug_leaves_the_pools_threads_unpinned_unless_the_user_says():
    everywhere = _thread_cpus("import pruneaug")
    assert len(everywhere) == 1  # every thread may run on every CPU of the process
    assert len(_thread_cpus("")) == 2  # TVM alone pins its worker to one core
    assert len(_thread_cpus("import pruneaug", TVM_BIND_THREADS="1")) == 2
