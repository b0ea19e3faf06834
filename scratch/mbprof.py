import sys, time, torch, sparsedsl as sd
from sparsedsl.passes.lowering import _LOWERINGS
from torch.profiler import profile, ProfilerActivity
out = sys.argv[1]
for text, heads in [("segments([2048, 4096, 8192, 16384], [1, 2, 4, 8])", 16), ("window(3200)", 16), ("blocks(128).local(25)", 16)]:
    m = sd.compile(sd.parse(text)); n = 65536
    m.block_mask(n, heads=heads, device="cuda"); torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        _LOWERINGS.clear(); torch.cuda.synchronize(); t = time.perf_counter()
        m.block_mask(n, heads=heads, device="cuda"); torch.cuda.synchronize(); ts.append((time.perf_counter() - t) * 1e3)
    _LOWERINGS.clear(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        m.block_mask(n, heads=heads, device="cuda"); torch.cuda.synchronize()
    ka = prof.key_averages()
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = [(e.key, e.count, e.cpu_time_total) for e in ka if "ynchron" in e.key or "Memcpy" in e.key or "emset" in e.key]
    gpu = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"{text}: build ms {sorted(ts)}; launches {launches}; gpu kernel us {gpu:.0f}; {syncs}")
    with open(f"{out}/{text[:8]}.txt", "w") as f:
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=40))
        f.write(prof.key_averages(group_by_stack_n=4).table(sort_by="self_cpu_time_total", row_limit=30))
