"""Run a script under accelerate's FSDP or DeepSpeed on CPU processes (gloo), for the tests:

    accelerate launch --config_file fsdp_or_deepspeed.yaml tests/accelerate_on_cpu.py train_inversion_dpo.py ...

accelerate (1.15) takes FSDP and DeepSpeed configurations only on GPUs (and other accelerators). On CPU it ignores an
FSDP config: with ACCELERATE_USE_CPU it wraps the model in DDP, without it every process runs as if it were alone.
With a DeepSpeed config it sets up every process as process 0 of 1 while DeepSpeed counts 2. This runs the same
code that GPUs run, on gloo: for FSDP it sets ACCELERATE_USE_CPU and, once accelerate has set up gloo and DDP, switches
it to the FSDP plugin built from the config; for DeepSpeed (whose CPU accelerator talks gloo) it gives accelerate
the gloo backend, which it does not pick itself without a GPU, and skips DeepSpeed's compiled shared-memory
all-reduce (torch.distributed's gloo all-reduce does the same sum)."""

import os
import runpy
import sys

if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
    os.environ["ACCELERATE_USE_CPU"] = "true"

from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

_accelerator_state_init, _partial_state_init = AcceleratorState.__init__, PartialState.__init__


def _accelerator_state_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # both states: each later AcceleratorState() copies the distributed type from PartialState's shared state
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


def _partial_state_on_gloo(self, cpu=False, **kwargs):
    kwargs.setdefault("backend", "gloo")
    _partial_state_init(self, cpu, **kwargs)


AcceleratorState.__init__ = _accelerator_state_with_fsdp_on_cpu
if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
    PartialState.__init__ = _partial_state_on_gloo
    # DeepSpeed's CPU backend compiles a shared-memory all-reduce kernel with the C++ compiler at start-up (minutes
    # on 2 cores, each clean machine); without it DeepSpeed's collectives go through torch.distributed on gloo
    import deepspeed.comm.torch  # noqa: E402

    # the module from sys.modules: the attribute deepspeed.comm.torch is the torch library itself (deepspeed.comm
    # imports torch after its submodule), so setting build_shm_op there left DeepSpeed compiling the kernel
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as if the script were run itself
runpy.run_path(sys.argv[0], run_name="__main__")
