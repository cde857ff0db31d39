"""Harm-category vocabularies of known data sets."""

# The 19 harm categories of PKU-SafeRLHF, in the key order of its
# ``response_{0,1}_harm_category`` dicts. Checked against the published data:
# the PKU-SafeRLHF-QA card numbers the categories 0-18 in this order, and the
# ``harm_category`` dicts of its rows (the same per-response labels) list their
# keys in it.
PKU_SAFERLHF_CATEGORIES = (
    "Endangering National Security",
    "Insulting Behavior",
    "Discriminatory Behavior",
    "Endangering Public Health",
    "Copyright Issues",
    "Violence",
    "Drugs",
    "Privacy Violation",
    "Economic Crime",
    "Mental Manipulation",
    "Human Trafficking",
    "Physical Harm",
    "Sexual Content",
    "Cybercrime",
    "Disrupting Public Order",
    "Environmental Damage",
    "Psychological Harm",
    "White-Collar Crime",
    "Animal Abuse",
)
