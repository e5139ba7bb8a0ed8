"""One process of the multi-process test (tests/test_distributed.py).

Usage: python _distributed_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_FILE
Each process owns 4 CPU devices; together they form a global mesh of
4 * NUM_PROCESSES devices over which synchronized batch norm runs.
"""

import sys

import jax

port, pid, nproc, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                           process_id=pid, initialization_timeout=60)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxnorm as jn  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _distributed_data import global_batch  # noqa: E402

assert jax.process_count() == nproc and len(jax.devices()) == 4 * nproc, jax.devices()
x, mask = global_batch()
mesh = jax.make_mesh((len(jax.devices()),), ("batch",))
rows = x.shape[0] // nproc
local = slice(pid * rows, (pid + 1) * rows)
batch_sharding = NamedSharding(mesh, P("batch"))
gx = jax.make_array_from_process_local_data(batch_sharding, x[local])
gm = jax.make_array_from_process_local_data(batch_sharding, mask[local])
stats = jn.init_batch_stats(x.shape[-1])


@jax.jit
@jax.shard_map(mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=(P("batch"), P()))
def sync_bn(x, mask):
  return jn.batch_norm(x, stats, training=True, where=mask, axis_name="batch", momentum=0.9)


y, new_stats = sync_bn(gx, gm)
y = multihost_utils.process_allgather(y, tiled=True)
if pid == 0:
  np.savez(out, y=np.asarray(y), mean=np.asarray(new_stats.mean), var=np.asarray(new_stats.var))
jax.distributed.shutdown()
print(f"process {pid}: ok")
