"""The paper's reported numbers (SPEC §5, §7), shown beside this project's results and never in place of them."""

from types import MappingProxyType

# Tables 1 (mouse) and 2 (human): organ -> (cell types, single-species baseline accuracy %, Mix-Geneformer accuracy %)
TABLE1 = MappingProxyType({
    "Brain": (15, 96.9, 97.6), "Heart": (11, 97.8, 97.7), "Kidney": (18, 94.9, 95.4),
    "Large_intestine": (7, 93.1, 94.6), "Limb_muscle": (9, 99.5, 99.7), "Mammary_gland": (7, 99.0, 99.1),
    "Spleen": (10, 98.7, 98.6), "Thymus": (6, 97.0, 97.6), "Tongue": (3, 94.9, 95.3),
})
TABLE2 = MappingProxyType({
    "Spleen": (6, 98.9, 99.0), "Brain": (6, 96.8, 97.7), "Immune": (10, 94.4, 95.1), "Kidney": (15, 92.8, 93.3),
    "Large_intestine": (16, 92.7, 93.4), "Liver": (12, 91.1, 91.2), "Lung": (16, 93.4, 94.3),
    "Pancreas": (15, 93.0, 93.5), "Placenta": (3, 97.9, 98.2),
})
TABLES = MappingProxyType({"mouse": TABLE1, "human": TABLE2})
BASELINE = MappingProxyType({"mouse": "mouse_geneformer", "human": "geneformer"})  # the single-species model
MODEL_NAMES = MappingProxyType({"mixgf": "Mix-Geneformer", "geneformer": "Geneformer",
                                "mouse_geneformer": "Mouse-Geneformer", "random": "random init",
                                "logreg": "logistic regression"})
KIDNEY_ABSTRACT = 95.8  # the arXiv abstract's Mix-Geneformer mouse kidney accuracy (Table 1 says 95.4)
