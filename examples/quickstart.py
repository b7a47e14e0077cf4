"""The README's quick start as a file: python examples/quickstart.py (tests/test_readme.py keeps them equal)."""
import asymlora
from asymlora.compare.task import bundled_classifier

model, train, collate = bundled_classifier("fortunes")  # all-MiniLM-L6-v2 + a new 5-way head; tokenized fortunes
model = asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=8, modules_to_save=["classifier"]))
print(asymlora.parameter_report(model))  # A: frozen random orthonormal (from the seed); B and the head: trained
asymlora.fit(model, train, collate, asymlora.TrainArgs(lr=3e-3, max_steps=5, batch_size=16))
asymlora.save_adapter(model, "out/adapter")  # B, the head and the seed; A is rebuilt and verified on load
asymlora.export_peft(model, "out/peft")      # what peft.PeftModel.from_pretrained loads
