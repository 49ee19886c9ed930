"""Datasets, synthetic data, transforms, samplers and loaders."""
from nformer_reid.data.datasets import (CUHK03, DATASETS, MSMT17, DatasetLayoutError, DukeMTMCreID, Market1501,
                                        ReIDDataset, build_dataset)
from nformer_reid.data.features import FeatureSet, load_features, save_features
from nformer_reid.data.synthetic import FeatureBenchmark, make_feature_benchmark, make_synthetic_market

__all__ = ["CUHK03", "DATASETS", "DatasetLayoutError", "DukeMTMCreID", "FeatureBenchmark", "FeatureSet", "MSMT17",
           "Market1501", "ReIDDataset", "build_dataset", "load_features", "make_feature_benchmark",
           "make_synthetic_market", "save_features"]
