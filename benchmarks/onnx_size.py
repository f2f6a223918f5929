"""ONNX file bytes vs the reported size_mb for uniform policies on ResNet-20 (digits, 80 training steps), and
torch/ORT agreement. Run: python benchmarks/onnx_size.py"""
import collections, torch, onnx, time, numpy as np, onnxruntime as ort
from squeezer.datasets import load_data
from squeezer.models import resnet20
from squeezer.policies.apply import apply_policy
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.spaces.space import SearchSpace
from squeezer.evaluators.cost import measure_cost
torch.set_num_threads(1)
d = load_data("digits"); torch.manual_seed(0)
from squeezer.evaluators.finetune import FitConfig, fit
m = fit(resnet20(num_classes=10, in_channels=1), d.train, FitConfig(steps=80)).eval()
x = d.example_inputs(1); xv = d.val.x[:256]
space = SearchSpace.from_model(m, x)
KNOBS = [{}, dict(w_bits=8), dict(w_bits=8, a_bits=8), dict(w_bits=4, a_bits=8), dict(w_bits=4),
         dict(w_bits=6, a_bits=8), dict(w_bits=2, a_bits=4), dict(a_bits=8)]
for kn in KNOBS:
    pol = Policy.uniform(space, **kn)
    q = apply_policy(m, pol, d.calibration(2), space=space)
    t = time.perf_counter(); p = export_onnx(q, x); dt = time.perf_counter() - t
    c = measure_cost(q, x, pol, space)
    g = onnx.load_from_string(p).graph
    ops = collections.Counter(n.op_type for n in g.node)
    o = ort.SessionOptions(); o.log_severity_level = 3
    r2 = ort.InferenceSession(p, o, providers=["CPUExecutionProvider"]).run(None, {"input": xv.numpy()})[0]
    with torch.no_grad(): r1 = q(xv).numpy()
    print(kn, len(p), round(c["size_mb"]*1e6), f"{len(p)/c['size_mb']/1e6:.3f}",
          f"{dt:.2f}s", np.abs(r1 - r2).max(), (r1.argmax(1)==r2.argmax(1)).mean(), dict(ops))
