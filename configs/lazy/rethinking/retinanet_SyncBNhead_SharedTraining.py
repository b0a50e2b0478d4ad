"""rethinking §5.2, Table 5 row 1 (shared training and population statistics: every head norm normalizes all FPN
levels together, Alg. 1 Row1; = upstream retinanet_SyncBNhead_SharedTraining.py)."""
from .retinanet_SyncBNhead import dataloader, lr_multiplier, model, optimizer, train

model.head.train_stats = "shared"
model.head.pop_stats = "shared"
train.output_dir = "output/lazy/rethinking/retinanet_SyncBNhead_SharedTraining"
