"""The currencies Stripe charges in, and each one's rules for `amount`.

An amount is an integer in the currency's smallest unit as Stripe counts it: cents for the
two-decimal currencies, whole units for the zero-decimal ones (`amount=500` in jpy is ¥500),
thousandths for the three-decimal ones. Stripe keeps two exceptions for backward compatibility:
isk and ugx are counted in hundredths although only whole units can be charged, so their
amounts must be divisible by 100; and the three-decimal currencies must end in 0, because
Stripe's partners charge them in tens of the smallest unit.
"""

from __future__ import annotations

from fractions import Fraction

# Stripe's presentment currencies for card payments (stripe.com/docs/currencies), lowercase.
CURRENCIES = frozenset(
    """
    aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd bob brl bsd bwp
    byn bzd cad cdf chf clp cny cop crc cve czk djf dkk dop dzd egp etb eur fjd fkp gbp gel
    gip gmd gnf gtq gyd hkd hnl htg huf idr ils inr isk jmd jod jpy kes kgs khr kmf krw kwd
    kyd kzt lak lbp lkr lrd lsl mad mdl mga mkd mmk mnt mop mur mvr mwk mxn myr mzn nad ngn
    nio nok npr nzd omr pab pen pgk php pkr pln pyg qar ron rsd rub rwf sar sbd scr sek sgd
    shp sle sos srd std szl thb tjs tnd top try ttd twd tzs uah ugx usd uyu uzs vnd vuv wst
    xaf xcd xcg xof xpf yer zar zmw
    """.split()
)

# Stripe lists ugx among these too, but its API takes ugx in hundredths (see HUNDREDTHS_ONLY).
ZERO_DECIMAL = frozenset(
    "bif clp djf gnf jpy kmf krw mga pyg rwf vnd vuv xaf xof xpf".split()
)
THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())
# Two-decimal in the API, charged in whole units only: amounts are multiples of 100.
HUNDREDTHS_ONLY = frozenset({"isk", "ugx"})

# Stripe's table of minimum charge amounts, in the smallest unit.
STRIPE_MINIMUMS = {
    "usd": 50, "aed": 200, "aud": 50, "bgn": 100, "brl": 50, "cad": 50, "chf": 50,
    "czk": 1500, "dkk": 250, "eur": 50, "gbp": 30, "hkd": 400, "huf": 17500, "inr": 50,
    "jpy": 50, "mxn": 1000, "myr": 200, "nok": 300, "nzd": 50, "pln": 200, "ron": 200,
    "sek": 300, "sgd": 50, "thb": 1000,
}

# Units of each other currency per US dollar, approximate (2025 figures, rounded): only used to
# set a minimum near Stripe's 0.50 USD where Stripe's table has no entry, so that a dust
# amount is refused in every currency. They are not quotes and need no updating for small
# moves. std is taken as ISO 4217 defines the code: the old dobra, 1000 to the new one (stn).
USD_RATES = {
    "afn": "70", "all": "90", "amd": "390", "ang": "1.79", "aoa": "920", "ars": "1200",
    "awg": "1.79", "azn": "1.70", "bam": "1.70", "bbd": "2", "bdt": "122", "bhd": "0.376",
    "bif": "2950", "bmd": "1", "bnd": "1.30", "bob": "6.91", "bsd": "1", "bwp": "13.6",
    "byn": "3.3", "bzd": "2", "cdf": "2850", "clp": "950", "cny": "7.2", "cop": "4100",
    "crc": "505", "cve": "96", "djf": "178", "dop": "61", "dzd": "131", "egp": "49",
    "etb": "135", "fjd": "2.25", "fkp": "0.76", "gel": "2.72", "gip": "0.76", "gmd": "72",
    "gnf": "8650", "gtq": "7.7", "gyd": "209", "hnl": "26", "htg": "131", "idr": "16400",
    "ils": "3.6", "isk": "125", "jmd": "158", "jod": "0.709", "kes": "129", "kgs": "87",
    "khr": "4000", "kmf": "425", "krw": "1400", "kwd": "0.306", "kyd": "0.83", "kzt": "510",
    "lak": "21600", "lbp": "89500", "lkr": "300", "lrd": "200", "lsl": "18", "mad": "9.2",
    "mdl": "17.5", "mga": "4500", "mkd": "53", "mmk": "2100", "mnt": "3580", "mop": "8.05",
    "mur": "46", "mvr": "15.4", "mwk": "1735", "mzn": "64", "nad": "18", "ngn": "1550",
    "nio": "36.8", "npr": "137", "omr": "0.385", "pab": "1", "pen": "3.6", "pgk": "4.1",
    "php": "57", "pkr": "283", "pyg": "7900", "qar": "3.64", "rsd": "100", "rub": "80",
    "rwf": "1440", "sar": "3.75", "sbd": "8.4", "scr": "14.5", "shp": "0.76", "sle": "22.7",
    "sos": "571", "srd": "37", "std": "22000", "szl": "18", "tjs": "10.5", "tnd": "3",
    "top": "2.35", "try": "40", "ttd": "6.78", "twd": "31", "tzs": "2600", "uah": "41.5",
    "ugx": "3650", "uyu": "40", "uzs": "12600", "vnd": "26000", "vuv": "120", "wst": "2.75",
    "xaf": "570", "xcd": "2.70", "xcg": "1.79", "xof": "570", "xpf": "104", "yer": "245",
    "zar": "18", "zmw": "25",
}


def exponent(currency: str) -> int:
    """Decimal places of an amount in the API: 0, 2 or 3."""
    if currency in ZERO_DECIMAL:
        return 0
    return 3 if currency in THREE_DECIMAL else 2


def step(currency: str) -> int:
    """What every amount in this currency must be a multiple of."""
    if currency in HUNDREDTHS_ONLY:
        return 100
    return 10 if currency in THREE_DECIMAL else 1


def _round_up(amount: int, multiple: int) -> int:
    return -(-amount // multiple) * multiple


def _derived_minimum(currency: str) -> int:
    """0.50 USD in `currency`, rounded up to two significant figures and to its step."""
    smallest_units = Fraction(USD_RATES[currency]) / 2 * 10 ** exponent(currency)
    amount = max(1, -(-smallest_units.numerator // smallest_units.denominator))
    amount = _round_up(amount, 10 ** max(0, len(str(amount)) - 2))
    return _round_up(amount, step(currency))


MINIMUMS = {c: STRIPE_MINIMUMS.get(c) or _derived_minimum(c) for c in sorted(CURRENCIES)}


def display(amount: int, currency: str) -> str:
    """An amount as a person writes it: `0.50 usd`, `50 jpy`, `0.190 bhd`."""
    places = exponent(currency)
    if places == 0:
        return f"{amount:,} {currency}"
    whole, fraction = divmod(amount, 10**places)
    return f"{whole:,}.{fraction:0{places}d} {currency}"
