"""Which imports break a CUDA build of llama-cpp-python in the same process (docs/decode-loops.md has the H100 run).

    python3 scripts/diag_llama_gpu.py MODEL.gguf

Each case is a fresh interpreter that imports something, loads the GGUF file (every layer on the GPU unless said)
and generates 8 tokens; the line per case gives its exit code (-11: SIGSEGV, -6: abort) and its last output.
"""

import subprocess
import sys
import time

LOAD = """
import llama_cpp, re
llm = llama_cpp.Llama(model_path={path!r}, n_ctx=256, n_gpu_layers={ngl}, verbose=False, seed=0)
out = []
for t in llm.generate(llm.tokenize(b'The river carries sand', add_bos=False), temp=0.0, top_k=1):
    out.append(t)
    if len(out) >= 8:
        break
libs = {{m.split()[-1].rsplit('/', 1)[-1] for m in open('/proc/self/maps') if re.search('cublas|cudart|gomp', m)}}
print('generated', len(out), 'libs', sorted(libs))
llm.close()
"""
TORCH_USE = ("import torch\na = torch.randn(512, 512, device='cuda', dtype=torch.float16)\n(a @ a).sum().item()\n"
             "print('torch ok', torch.version.cuda)\n")


def cases(path: str) -> dict[str, str]:
    load = LOAD.format(path=path, ngl=-1)
    return {
        "llama_cpp alone, every layer on the GPU": load,
        "llama_cpp alone, no layer on the GPU": LOAD.format(path=path, ngl=0),
        "numpy first": "import numpy\n" + load,
        "numpy and a BLAS call first": "import numpy as np\nnp.ones((800, 800)) @ np.ones((800, 800))\n" + load,
        "hydra and omegaconf first": "import hydra, omegaconf\n" + load,
        "torch imported first": "import torch\n" + load,
        "torch used first": TORCH_USE + load,
        "llama_cpp, then torch used": load + TORCH_USE,
        "llama_cpp imported, torch used, then the load": "import llama_cpp\n" + TORCH_USE + load,
        "a llama.cpp process of the study (INFERLAB_LLAMA_PROCESS=1), numpy first":
            "import inferlab\nimport numpy\n" + load,
    }


def main() -> None:
    import os

    if len(sys.argv) != 2:
        sys.exit("usage: python3 scripts/diag_llama_gpu.py MODEL.gguf")
    path = sys.argv[1]
    for name, code in cases(path).items():
        env = {**os.environ, "INFERLAB_LLAMA_PROCESS": "1"} if "INFERLAB_LLAMA_PROCESS" in name else None
        t = time.time()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])[-600:]
        print(f"== {name}: exit code {r.returncode} in {time.time() - t:.1f} s :: {tail}", flush=True)


if __name__ == "__main__":
    main()
