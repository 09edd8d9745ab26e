"""Column roles of a NONMEM-style event table, matched case-insensitively.

Every column whose upper-cased name is not a role below is a covariate.
"""

ROLES = (
    "ID",  # subject identifier (number or text)
    "TIME",  # record time
    "DV",  # dependent variable (observed value)
    "AMT",  # dose amount
    "EVID",  # event id: 0 obs, 1 dose, 2 other, 3 reset, 4 reset+dose, 101 rxode2 dose into CMT 1
    "MDV",  # missing dependent variable: 1 = not an observation
    "CMT",  # compartment (1-based, NONMEM numbering)
    "RATE",  # zero-order rate; -1 modelled rate, -2 modelled duration
    "II",  # interdose interval
    "ADDL",  # number of additional doses every II
    "SS",  # steady-state flag 0/1/2
    "DVID",  # output identifier (number or text)
    "LLOQ",  # lower limit of quantification of the record
    "BLQ",  # 1 = below LLOQ (left-censored)
    "CENS",  # 1 left-censored (DV holds the LLOQ), -1 right-censored (DV holds the ULOQ)
)

REQUIRED = ("ID", "TIME", "DV")
NUMERIC = ("TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "II", "ADDL", "SS", "LLOQ", "BLQ", "CENS")
VALID_EVID = (0, 1, 2, 3, 4, 101)
MISSING_TOKENS = (".", "", "NA", "NaN", "nan")
