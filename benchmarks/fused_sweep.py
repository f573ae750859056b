import json, os, sys, itertools
sys.path.insert(0, ".")
import torch, triton
from snakes_lib import fused_block as FB
dev = "cuda"; b, L, C = 8, 2048, 3456
x = torch.randn(b, L, 3352 + 3456 - 3352, device=dev, dtype=torch.bfloat16)  # contiguous (b, L, C)
big = torch.randn(b, L, 5016, device=dev, dtype=torch.bfloat16)
xs = big[:, :, 1536:1536 + C]                         # the model's strided slice of in_proj
w = torch.randn(C, 4, device=dev); bias = torch.randn(C, device=dev)
do = torch.randn(b, L, C, device=dev, dtype=torch.bfloat16)
bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")
res = dict(shape=[b, L, C], fwd={}, bwd={})
for BT, BC, nw in itertools.product([32, 64], [64, 128, 256], [4, 8]):
    FB.CONV_CONFIG.update(BT=BT, BC=BC, num_warps=nw, bwd_BT=BT, bwd_BC=BC, bwd_num_warps=nw)
    f = bench(lambda: FB.causal_conv_fwd(xs, w, bias)); g = bench(lambda: FB.causal_conv_bwd(do, xs, w, bias))
    res["fwd"][f"{BT}x{BC}w{nw}"] = f; res["bwd"][f"{BT}x{BC}w{nw}"] = g
    print(f"conv BT {BT} BC {BC} warps {nw}: fwd {f*1000:7.1f} us  bwd {g*1000:7.1f} us", flush=True)
y = torch.randn(b * L, 1536, device=dev, dtype=torch.bfloat16); z = big[:, :, :1536].reshape(b * L, 1536)
wn = torch.ones(1536, device=dev)
o, r = FB.gated_rmsnorm_fwd(y, z, wn, 1536, 1e-5)
res["norm_fwd_us"] = 1000 * bench(lambda: FB.gated_rmsnorm_fwd(y, z, wn, 1536, 1e-5))
res["norm_bwd_us"] = 1000 * bench(lambda: FB.gated_rmsnorm_bwd(y, y, z, wn, r, 1536))
print("gated norm fwd %.1f us bwd %.1f us" % (res["norm_fwd_us"], res["norm_bwd_us"]))
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "fused_sweep.json"), "w"), indent=1)
