"""Ad hoc: the context package with its neighbours replaced by the slice itself (what it computes
without context), as a package the engine runs. Usage: python ablate.py PACKAGE.json OUT_DIR"""
import json, sys
from pathlib import Path
import torch
from CovidInfectionSegLib.model_package import load_model_package
from covidseg_training.manifest import build_manifest

class CentreOnly(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, 1:2]
        return self.net(torch.cat([centre, centre, centre], dim=1))

package = load_model_package(sys.argv[1])
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
module = torch.jit.script(CentreOnly(package.module).eval())
pt = out / "covid_unet_v2_context_ablated.pt"
torch.jit.save(module, str(pt))
manifest = build_manifest(pt, name="covid_unet_v2_context_ablated", version=package.version + "-noctx",
                          architecture=package.manifest["architecture"], recipe=package.recipe,
                          training_data=package.manifest["training_data"])
(out / "covid_unet_v2_context_ablated.json").write_text(json.dumps(manifest, indent=2))
w = torch.jit.load(sys.argv[1].replace(".json", ".pt")).state_dict()["encoders.0.0.weight"]
print("first conv weight norm per input channel:", [round(float(w[:, c].norm()), 4) for c in range(w.shape[1])])
