"""How fast this box's cores are today: a fixed single-core workload, pure Python and torch on one thread.

Suite and benchmark times on the same 2-core box have varied by a third from one day to the next with nothing
else running; print this beside a timing so two timings can be read together (lower is a faster box).

    .venv/bin/python benchmarks/box_speed.py
"""

import time

import torch


def main() -> None:
    torch.set_num_threads(1)
    started, total = time.perf_counter(), 0
    for i in range(20_000_000):
        total += i * i % 7
    python = time.perf_counter() - started
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    for _ in range(400):
        a = (a @ a).tanh()
    print(f"python {python:.2f} s  torch {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
