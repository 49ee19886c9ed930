"""Datasets, synthetic data, transforms, samplers and loaders."""
from nformer_reid.data.datasets import (CUHK03, DATASETS, MSMT17, DatasetLayoutError, DukeMTMCreID, Market1501,
                                        ReIDDataset, build_dataset)
from nformer_reid.data.features import (FeatureSet, count_feature_rows, load_feature_rows, load_features,
                                        load_query_gallery, save_features, save_query_gallery)
from nformer_reid.data.synthetic import FeatureBenchmark, make_feature_benchmark, make_synthetic_market

__all__ = ["CUHK03", "DATASETS", "DatasetLayoutError", "DukeMTMCreID", "FeatureBenchmark", "FeatureSet", "MSMT17",
           "Market1501", "ReIDDataset", "build_dataset", "count_feature_rows", "load_feature_rows", "load_features",
           "load_query_gallery", "make_feature_benchmark", "make_synthetic_market", "save_features",
           "save_query_gallery"]
