"""Launches N processes of one command on this machine, joined over loopback (CPU multi-process JAX).

    python -m disam_jax.harness.launch --num-processes 2 --devices-per-process 2 -- \\
        disam-train --dataset rotated_digits --algorithm disam --steps 200

Each process gets `JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` and, for CPU,
`XLA_FLAGS=--xla_force_host_platform_device_count=<devices-per-process>`; the harness reads them (see
`distributed.DistributedConfig.from_env`). If any process fails, the others are stopped and the launcher exits
with that process's exit code, naming it: a dead peer never leaves the job hanging. A command that cannot be found
(``disam-train`` when the environment's bin folder is not on PATH) is refused before anything starts, with the full
path or the ``python -m`` form to write instead. On a TPU pod or a GPU cluster you do not need this launcher: run
the same command on every host (see docs/distributed.md).
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# The console scripts pyproject installs -> the module that `python -m` runs in their place.
_SCRIPTS = {"disam-train": "disam_jax.harness.cli", "disam-launch": "disam_jax.harness.launch"}


def _check_program(program: str, env: dict) -> None:
  """Raises ValueError (one line: what to write instead) when `program` is neither on env's PATH nor a path to an
  executable file."""
  if shutil.which(program, path=env.get("PATH", os.defpath)) is not None:
    return
  beside = os.path.join(os.path.dirname(sys.executable), program)
  if os.sep not in program and os.access(beside, os.X_OK) and not os.path.isdir(beside):
    hint = f"write its full path, {beside}, or put {os.path.dirname(beside)} on PATH"
  elif program in _SCRIPTS:
    hint = f'write "{sys.executable} -m {_SCRIPTS[program]}" in its place, or install disam_jax where PATH finds it'
  else:
    hint = "write its full path, or put its folder on PATH"
  raise ValueError(f"command {program!r} not found (PATH={env.get('PATH', '')!r}): {hint}.")


def launch(
  command: Sequence[str],
  num_processes: int,
  devices_per_process: int = 1,
  port: int | None = None,
  timeout: float | None = None,
  env: dict | None = None,
) -> int:
  """Runs `command` as `num_processes` processes; returns 0, or the exit code of the first process that failed."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(
      f"num_processes and devices_per_process must be >= 1; got {num_processes} and {devices_per_process}."
    )
  if not command:
    raise ValueError("no command to launch (put it after --).")
  _check_program(command[0], dict(os.environ if env is None else env))
  port = port or free_port()
  procs = []
  for pid in range(num_processes):
    proc_env = dict(os.environ if env is None else env)
    flags = proc_env.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
    proc_env.update(
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES=str(num_processes),
      JAX_PROCESS_ID=str(pid),
      JAX_PLATFORMS=proc_env.get("JAX_PLATFORMS", "cpu"),
      XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip(),
    )
    try:
      procs.append(subprocess.Popen(list(command), env=proc_env))
    except OSError as e:  # found but not startable (permissions, not an executable format)
      for p in procs:
        p.kill()
        p.wait()
      raise ValueError(f"cannot start {command[0]!r}: {e.strerror or e}.") from None
  deadline = None if timeout is None else time.monotonic() + timeout
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        pid, code = failed[0]
        print(
          f"[launch] process {pid} exited with code {code}; stopping the other {num_processes - 1} process(es).",
          file=sys.stderr,
        )
        return code if code > 0 else 128 - code
      if all(c == 0 for c in codes):
        return 0
      if deadline is not None and time.monotonic() > deadline:
        print(f"[launch] timed out after {timeout} s; stopping all processes.", file=sys.stderr)
        return 124
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        p.kill()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    prog="disam-launch",
    allow_abbrev=False,
  )
  parser.add_argument("--num-processes", type=int, required=True, help="number of processes to start")
  parser.add_argument("--devices-per-process", type=int, default=1, help="host CPU devices per process")
  parser.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  try:
    return launch(command, args.num_processes, args.devices_per_process, args.port, args.timeout)
  except ValueError as e:
    parser.error(str(e))


if __name__ == "__main__":
  sys.exit(main())
