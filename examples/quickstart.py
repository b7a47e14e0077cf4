import torch
from transformers import BertConfig, BertForSequenceClassification

import asymlora

model = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=128))
cfg = asymlora.AsymLoraConfig.preset("b-only", r=8, modules_to_save=["classifier"])
model = asymlora.wrap(model, cfg)          # A: frozen random orthonormal (from the seed), B: zero, trained
print(asymlora.parameter_report(model))

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-4)
batch = {"input_ids": torch.randint(0, 1000, (4, 16)), "labels": torch.tensor([0, 1, 0, 1])}
model(**batch).loss.backward(); opt.step()

asymlora.save_adapter(model, "quickstart-adapter")     # stores B + the seed; A is rebuilt and verified on load
asymlora.export_peft(model, "quickstart-peft")         # loadable by peft.PeftModel.from_pretrained
merged = asymlora.merge_and_unload(model)              # plain transformers model, zero inference overhead
