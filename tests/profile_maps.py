"""The vendors' register maps, transcribed by hand into a table the profile tests serve a meter from.

This table is deliberately NOT generated from drivers/modbus/profiles/*.toml: each row was copied from the
document named in its `MeterMap.document` (register as printed there, function code, type, word order, the
meter's own unit and what converts it to the unit docs/profiles.md asks for). tests/test_profile_maps.py
fills a real pymodbus server's registers from these rows, polls it through the shipped profile with the real
driver, and compares every value and unit. A profile whose address, word order, type or scale disagrees
with the vendor's map therefore fails a test, whatever the profile file says about itself.

`source` per row says where the row was checked: "vendor" (the manufacturer's own document, as cited),
"third-party" (public integrations or a data-logger vendor's list, not the manufacturer) or "assumed"
(the vendor's map leaves it open; the assumption is the profile's and is marked unconfirmed there).
A profile marked verified must have only "vendor" rows: the test checks that too.

A row may name a `Carry`: a register elsewhere in the map that counts how often the value rolled over (the
GIMAC1000's "Giga counter"); the meter is served with a count above 0, so a profile that forgets it fails.
"""

from __future__ import annotations

from dataclasses import dataclass

FC03, FC04 = 3, 4


@dataclass(frozen=True, slots=True)
class Carry:
    register: str          # the roll-over counter's register as printed in the source document
    address: int           # its 0-based address, in the row's register space (a uint16)
    count: int             # what the test meter holds there: above 0
    per_count: float       # what one count is worth in the row's raw unit


@dataclass(frozen=True, slots=True)
class Row:
    name: str              # point name, vocabulary of docs/profiles.md
    register: str          # as printed in the source document
    function: int          # 3 = read holding registers, 4 = read input registers
    address: int           # 0-based address on the wire
    type: str              # float32, int16, uint16, int32, uint32, int64, uint64, bool (with `bit`)
    word_order: str        # ABCD (high word first) or CDAB (low word first)
    raw: float             # the value as the meter sends it, in the meter's unit (before any scale)
    factor: float          # meter unit -> normalised unit (W -> kW: 0.001; 0.1 V steps -> V: 0.1)
    unit: str | None       # normalised unit the reading must carry
    source: str = "vendor"  # vendor, third-party or assumed (see the module docstring)
    carry: Carry | None = None  # the register counting the value's roll-overs, if the map has one
    bit: int | None = None  # type "bool": the bit of the register (raw is the register's value)


@dataclass(frozen=True, slots=True)
class MeterMap:
    profile: str
    document: str
    rows: tuple[Row, ...]


def _r(name: str, register: str, function: int, address: int, type_: str, raw: float, factor: float,
       unit: str | None, word_order: str = "ABCD", source: str = "vendor", *, carry: Carry | None = None,
       bit: int | None = None) -> Row:
    return Row(name, register, function, address, type_, word_order, raw, factor, unit, source, carry, bit)


# Eastron SDM630-Modbus MID V2 user manual, 1.2.1 "Input Registers" (function 04, every value an IEEE 754
# float, high word first), 1.3.1 holding registers; copy read: manualshive "eastron/sdm630-modbus-mid-v2"
# pages 24-28. Power in W, energy in kWh/kvarh.
EASTRON_SDM630 = MeterMap("eastron_sdm630", "Eastron SDM630-Modbus MID V2 user manual, 1.2.1 Input Registers", (
    _r("voltage_l1_n", "30001", FC04, 0, "float32", 230.1, 1, "V"),
    _r("voltage_l2_n", "30003", FC04, 2, "float32", 231.2, 1, "V"),
    _r("voltage_l3_n", "30005", FC04, 4, "float32", 229.3, 1, "V"),
    _r("current_l1", "30007", FC04, 6, "float32", 10.25, 1, "A"),
    _r("current_l2", "30009", FC04, 8, "float32", 11.5, 1, "A"),
    _r("current_l3", "30011", FC04, 10, "float32", 9.75, 1, "A"),
    _r("active_power_l1", "30013", FC04, 12, "float32", 2310.5, 0.001, "kW"),
    _r("active_power_l2", "30015", FC04, 14, "float32", 2645.25, 0.001, "kW"),
    _r("active_power_l3", "30017", FC04, 16, "float32", 2187.75, 0.001, "kW"),
    _r("power_factor_l1", "30031", FC04, 30, "float32", 0.98, 1, None),
    _r("power_factor_l2", "30033", FC04, 32, "float32", -0.97, 1, None),
    _r("power_factor_l3", "30035", FC04, 34, "float32", 0.96, 1, None),
    _r("voltage_ln_avg", "30043", FC04, 42, "float32", 230.2, 1, "V"),
    _r("current_avg", "30047", FC04, 46, "float32", 10.5, 1, "A"),
    _r("active_power_total", "30053", FC04, 52, "float32", 7143.5, 0.001, "kW"),
    _r("apparent_power_total", "30057", FC04, 56, "float32", 7400.25, 0.001, "kVA"),
    _r("reactive_power_total", "30061", FC04, 60, "float32", -1520.5, 0.001, "kvar"),
    _r("power_factor_total", "30063", FC04, 62, "float32", 0.965, 1, None),
    _r("frequency", "30071", FC04, 70, "float32", 59.98, 1, "Hz"),
    _r("energy_active_import", "30073", FC04, 72, "float32", 12345.6, 1, "kWh"),
    _r("energy_active_export", "30075", FC04, 74, "float32", 234.5, 1, "kWh"),
    _r("energy_reactive_import", "30077", FC04, 76, "float32", 3456.7, 1, "kvarh"),
    _r("energy_reactive_export", "30079", FC04, 78, "float32", 45.6, 1, "kvarh"),
    _r("demand_active_power", "30085", FC04, 84, "float32", 6800.0, 0.001, "kW"),
    _r("demand_active_power_max", "30087", FC04, 86, "float32", 9100.0, 0.001, "kW"),
    _r("voltage_l1_l2", "30201", FC04, 200, "float32", 398.6, 1, "V"),
    _r("voltage_l2_l3", "30203", FC04, 202, "float32", 399.1, 1, "V"),
    _r("voltage_l3_l1", "30205", FC04, 204, "float32", 397.9, 1, "V"),
    _r("voltage_ll_avg", "30207", FC04, 206, "float32", 398.5, 1, "V"),
    _r("current_n", "30225", FC04, 224, "float32", 0.85, 1, "A"),
))

# LS ELECTRIC "[GIMAC1000] Modbus Map_KO_V44_202402" (Korean; p. = PDF page, the map prints none), read from a
# third party's public copy (GitHub uptec-ai/RlcLoadBank_Separate @ c71de1f6, Document/통신자료/); its rows
# 30001-30035 match page 1 of the English V4.0 20210308 and 202402 copies. Input registers, FC04, format F004
# ("IEEE754 32bit short float form", p.7), SWAP column "O" on every 32-bit row: the word order follows the
# meter's swap setting (41009 high byte, 1 = off, the map's default), and the map does not say which order
# either setting gives. So every float32 row is "assumed" (ABCD); the 16-bit rows have no word order to assume.
# The energy rows say "전력량 Read 시 Giga 카운터 값(305xx)을 합산 필요" (add the Giga counter when reading energy,
# p.1); that a count is worth 1e9 Wh is inferred from the ranges (float 0 ~ 999,999,999.9, counter 0 ~ 999,
# pp.1, 5-6; the catalog's energy range 0.000 Wh ~ 999.9 GWh, printed p.254, fits), another reason those rows
# are "assumed".
_GIMAC = "assumed"
_GIGA = 1e9
_GIMAC_COMMON = (
    _r("voltage_ln_avg", "30001 (p.1)", FC04, 0, "float32", 220.4, 1, "V", source=_GIMAC),  # 평균 전압
    _r("current_avg", "30003 (p.1)", FC04, 2, "float32", 41.5, 1, "A", source=_GIMAC),  # 평균 전류
    _r("current_l1", "30005 (p.1)", FC04, 4, "float32", 40.25, 1, "A", source=_GIMAC),  # A상 전류
    _r("current_l2", "30007 (p.1)", FC04, 6, "float32", 42.75, 1, "A", source=_GIMAC),
    _r("current_l3", "30009 (p.1)", FC04, 8, "float32", 41.5, 1, "A", source=_GIMAC),
    _r("voltage_l1_n", "30011 (p.1)", FC04, 10, "float32", 220.1, 1, "V", source=_GIMAC),  # A상 전압
    _r("voltage_l2_n", "30013 (p.1)", FC04, 12, "float32", 221.3, 1, "V", source=_GIMAC),
    _r("voltage_l3_n", "30015 (p.1)", FC04, 14, "float32", 219.8, 1, "V", source=_GIMAC),
    _r("voltage_l1_l2", "30017 (p.1)", FC04, 16, "float32", 381.2, 1, "V", source=_GIMAC),  # AB상 선간전압
    _r("voltage_l2_l3", "30019 (p.1)", FC04, 18, "float32", 382.6, 1, "V", source=_GIMAC),
    _r("voltage_l3_l1", "30021 (p.1)", FC04, 20, "float32", 380.9, 1, "V", source=_GIMAC),
    _r("power_factor_total", "30023 (p.1)", FC04, 22, "float32", -0.93, 1, None, source=_GIMAC),  # 역률, - = lead
    _r("active_power_total", "30025 (p.1)", FC04, 24, "float32", 25430.5, 0.001, "kW", source=_GIMAC),  # W
    _r("reactive_power_total", "30027 (p.1)", FC04, 26, "float32", -4120.25, 0.001, "kvar", source=_GIMAC),  # Var
    _r("apparent_power_total", "30029 (p.1)", FC04, 28, "float32", 27390.75, 0.001, "kVA", source=_GIMAC),  # VA
    _r("frequency", "30031 (p.1)", FC04, 30, "float32", 60.02, 1, "Hz", source=_GIMAC),
    # 순방향유효전력량 Wh + 유효전력량 Giga 카운터 30531 (p.5)
    _r("energy_active_import", "30033 (p.1)", FC04, 32, "float32", 9876543.0, 0.001, "kWh", source=_GIMAC,
       carry=Carry("30531 (p.5)", 530, 3, _GIGA)),
    # 순방향무효전력량 Varh + 무효전력량 Giga 카운터 30532 (p.6)
    _r("energy_reactive_import", "30035 (p.1)", FC04, 34, "float32", 1234567.0, 0.001, "kvarh", source=_GIMAC,
       carry=Carry("30532 (p.6)", 531, 1, _GIGA)),
    # 피상전력량 VAh + 피상전력량 Giga 카운터 30533 (p.6)
    _r("energy_apparent", "30037 (p.1)", FC04, 36, "float32", 876543.0, 0.001, "kVAh", source=_GIMAC,
       carry=Carry("30533 (p.6)", 532, 4, _GIGA)),
)
# Holding registers, FC03 (p.6; 40000번지는 SWAP 적용치 않음, no swap in 4xxxx). 41001 제품 옵션 사양, F224 (p.8):
# D0 기능 0 = NO, 1 = EX; D3 RS485. 41009 485 통신속도 및 SWAP 여부, F218 (p.7): high byte 1 = swap off, low 3 = 38400.
_GIMAC_SETTINGS = (
    _r("rs485_baud_and_swap", "41009 (p.6)", FC03, 1008, "uint16", 0x0103, 1, None),
)
LS_GIMAC1000 = MeterMap("ls_gimac1000", "LS ELECTRIC [GIMAC1000] Modbus Map KO V44 202402, pp.1, 5-8", (
    *_GIMAC_COMMON,
    _r("ex_model", "41001 (p.6)", FC03, 1000, "bool", 0b01000, 1, None, bit=0),  # a NO model with RS485
    *_GIMAC_SETTINGS,
))
# The same map's "EX Model만 지원" (EX model only) rows; a NO model does not have them (catalog p.254: '-').
LS_GIMAC1000_EX = MeterMap("ls_gimac1000_ex", "LS ELECTRIC [GIMAC1000] Modbus Map KO V44 202402, pp.1-2, 5-8", (
    *_GIMAC_COMMON,
    # 역방향유효전력량 Wh + 역유효전력량 Giga 카운터 30534 (p.6), both EX only
    _r("energy_active_export", "30045 (p.1)", FC04, 44, "float32", 345678.0, 0.001, "kWh", source=_GIMAC,
       carry=Carry("30534 (p.6)", 533, 2, _GIGA)),
    # 역방향무효전력량 Varh + 역무효전력량 Giga 카운터 30535 (p.6)
    _r("energy_reactive_export", "30047 (p.1)", FC04, 46, "float32", 45678.0, 0.001, "kvarh", source=_GIMAC,
       carry=Carry("30535 (p.6)", 534, 1, _GIGA)),
    _r("active_power_l1", "30049 (p.1)", FC04, 48, "float32", 8450.5, 0.001, "kW", source=_GIMAC),  # A상 유효전력 W
    _r("active_power_l2", "30051 (p.1)", FC04, 50, "float32", 8610.25, 0.001, "kW", source=_GIMAC),
    _r("active_power_l3", "30053 (p.1)", FC04, 52, "float32", 8369.75, 0.001, "kW", source=_GIMAC),
    _r("demand_active_power", "30111 (p.2)", FC04, 110, "float32", 24100.0, 0.001, "kW", source=_GIMAC),  # 전력 디멘드
    # MAX 디멘드 유효전력 W
    _r("demand_active_power_max", "30147 (p.2)", FC04, 146, "float32", 31250.0, 0.001, "kW", source=_GIMAC),
    _r("ex_model", "41001 (p.6)", FC03, 1000, "bool", 0b01001, 1, None, bit=0),  # an EX model with RS485
    *_GIMAC_SETTINGS,
))
# What a NO (basic) model lacks, as (function, first, last) 0-based: the rows marked "EX Model만 지원" on pp.1-6
# (30045-30519 and 30537-30541, two registers each) and the EX Giga counters 30534-30535 (p.6).
GIMAC1000_EX_ONLY = ((FC04, 44, 519), (FC04, 533, 534), (FC04, 536, 541))

# Rootech "Accura 2300S/2350 Communication User Guide" rev 1.41 (2015-07-20), chapter 2 "Modbus Map Overview",
# printed p.29 (copy read: manualslib 1601927 ?page=29): holding registers, "register address is calculated by
# subtracting one from register number" - so FC03 and address = register - 1 in every row are Rootech's. The
# guide's measurement-data pages were in no copy that could be read (searched 2026-12-04), so the registers,
# types and units of the module 0 block (11201...) come from two public integrations (an OpenEMS Accura2300
# component and a C++ client): every row is third-party, and there is no energy counter or voltage row.
_ACCURA = "third-party"
ROOTECH_ACCURA2350 = MeterMap("rootech_accura2350", "Accura 2300S/2350 Communication User Guide rev 1.41 p.29 "
                              "(addressing, holding registers); block layout third-party", (
    _r("current_l1", "11201", FC03, 11200, "float32", 12.5, 1, "A", source=_ACCURA),
    _r("current_l2", "11203", FC03, 11202, "float32", 13.25, 1, "A", source=_ACCURA),
    _r("current_l3", "11205", FC03, 11204, "float32", 11.75, 1, "A", source=_ACCURA),
    _r("current_avg", "11207", FC03, 11206, "float32", 12.5, 1, "A", source=_ACCURA),
    _r("active_power_l1", "11261", FC03, 11260, "float32", 2.75, 1, "kW", source=_ACCURA),
    _r("active_power_l2", "11263", FC03, 11262, "float32", 2.875, 1, "kW", source=_ACCURA),
    _r("active_power_l3", "11265", FC03, 11264, "float32", 2.5, 1, "kW", source=_ACCURA),
    _r("active_power_total", "11267", FC03, 11266, "float32", 8.125, 1, "kW", source=_ACCURA),
    _r("reactive_power_total", "11275", FC03, 11274, "float32", -1.375, 1, "kvar", source=_ACCURA),
))

# Schneider Electric "PM556x_PublicModbusRegisterList_10th_August-23.xlsx" (rev 1.4, 2022-04-05), sheet
# "Register List", Excel row in each comment; every row is "Y" for PM5560, PM5561 and PM5563. Register numbers
# as printed, units as printed (FLOAT32 in A, V, kW, kVAR, kVA, Hz; INT64 in Wh, VARh, VAh). Word order: Schneider
# FAQ FA275749, "Most Significant Register format (Big Endian)" for the PM5000 series incl. PM5500.
# "vendor" covers the register, size, type, unit and word order. The address column applies register - 1 with
# function 03, which the PM5500 documents read do not print (Schneider prints "register = address + 1" for the
# same blocks in its iEM3000 manual): that is why the profile stays verified = false although every row is
# Schneider's.
SCHNEIDER_PM5500 = MeterMap("schneider_pm5500", "Schneider PM556x Public Modbus Register List rev 1.4, Register List", (
    _r("current_l1", "3000", FC03, 2999, "float32", 101.5, 1, "A"),                # row 184 Current A
    _r("current_l2", "3002", FC03, 3001, "float32", 98.25, 1, "A"),                # row 185 Current B
    _r("current_l3", "3004", FC03, 3003, "float32", 102.75, 1, "A"),               # row 186 Current C
    _r("current_n", "3006", FC03, 3005, "float32", 3.5, 1, "A"),                   # row 187 Current N
    _r("current_avg", "3010", FC03, 3009, "float32", 100.8, 1, "A"),               # row 189 Current Avg
    _r("voltage_l1_l2", "3020", FC03, 3019, "float32", 400.5, 1, "V"),             # row 196 Voltage A-B
    _r("voltage_l2_l3", "3022", FC03, 3021, "float32", 401.25, 1, "V"),            # row 197 Voltage B-C
    _r("voltage_l3_l1", "3024", FC03, 3023, "float32", 399.75, 1, "V"),            # row 198 Voltage C-A
    _r("voltage_ll_avg", "3026", FC03, 3025, "float32", 400.5, 1, "V"),            # row 199 Voltage L-L Avg
    _r("voltage_l1_n", "3028", FC03, 3027, "float32", 231.1, 1, "V"),              # row 200 Voltage A-N
    _r("voltage_l2_n", "3030", FC03, 3029, "float32", 231.6, 1, "V"),              # row 201 Voltage B-N
    _r("voltage_l3_n", "3032", FC03, 3031, "float32", 230.7, 1, "V"),              # row 202 Voltage C-N
    _r("voltage_ln_avg", "3036", FC03, 3035, "float32", 231.1, 1, "V"),            # row 203 Voltage L-N Avg
    _r("active_power_l1", "3054", FC03, 3053, "float32", 22.5, 1, "kW"),           # row 214 Active Power A
    _r("active_power_l2", "3056", FC03, 3055, "float32", 21.75, 1, "kW"),          # row 215 Active Power B
    _r("active_power_l3", "3058", FC03, 3057, "float32", 23.25, 1, "kW"),          # row 216 Active Power C
    _r("active_power_total", "3060", FC03, 3059, "float32", 67.5, 1, "kW"),        # row 217 Active Power Total
    _r("reactive_power_total", "3068", FC03, 3067, "float32", 12.125, 1, "kvar"),  # row 221, kVAR
    _r("apparent_power_total", "3076", FC03, 3075, "float32", 68.625, 1, "kVA"),   # row 225
    # Row 230 Power Factor Total, 4Q_FP_PF: 1.05 is PF 0.95 leading (quadrant 4), passed on undecoded.
    _r("power_factor_total_4q", "3084", FC03, 3083, "float32", 1.05, 1, None),
    _r("frequency", "3110", FC03, 3109, "float32", 50.01, 1, "Hz"),               # row 239
    _r("energy_active_import", "3204", FC03, 3203, "int64", 9_876_543_210, 0.001, "kWh"),      # row 255, Wh
    _r("energy_active_export", "3208", FC03, 3207, "int64", 12_345_678, 0.001, "kWh"),         # row 256, Wh
    _r("energy_reactive_import", "3220", FC03, 3219, "int64", 1_234_567_890, 0.001, "kvarh"),  # row 259, VARh
    _r("energy_reactive_export", "3224", FC03, 3223, "int64", 7_654_321, 0.001, "kvarh"),      # row 260, VARh
    _r("energy_apparent", "3236", FC03, 3235, "int64", 10_203_040_506, 0.001, "kVAh"),         # row 263, VAh
    _r("demand_active_power", "3766", FC03, 3765, "float32", 58.25, 1, "kW"),      # row 303 Present Demand
    _r("demand_active_power_max", "3770", FC03, 3769, "float32", 96.5, 1, "kW"),   # row 305 Peak Demand
))

# ABB "M4M Modbus map - v.1.3N" (xlsx), sheet "Mapping Table": register printed in hex "exactly as it is sent
# on the bus" (manual 2CSG445050D0201 V1.05, p.13), function 03 (p.8), high word first (p.12). Every row below is
# marked "M4M 20 (all versions); M4M 30 (all versions)". The meter's units are 0.1 V, 0.01 A, 0.01 W/var/VA,
# 0.01 Hz, 0.001 (PF), 0.01 kWh/kvarh/"kVA" (the table's word for kVAh). Both documents read from the public
# copy in github heinrich321/abb-teltonika @0f1fc5c (ABB/). The spreadsheet row follows each entry.
ABB_M4M30 = MeterMap("abb_m4m30", "ABB M4M Modbus map v.1.3N, sheet Mapping Table (manual 2CSG445050D0201 V1.05 "
                     "pp.8-13)", (
    _r("energy_active_import", "5000", FC03, 0x5000, "uint64", 5_000_000_123, 0.01, "kWh"),     # row 3
    _r("energy_active_export", "5004", FC03, 0x5004, "uint64", 2_345_678, 0.01, "kWh"),         # row 4
    _r("energy_reactive_import", "500C", FC03, 0x500C, "uint64", 98_765_432, 0.01, "kvarh"),    # row 6
    _r("energy_reactive_export", "5010", FC03, 0x5010, "uint64", 4_321_001, 0.01, "kvarh"),     # row 7
    _r("energy_apparent_import", "5018", FC03, 0x5018, "uint64", 5_100_200_300, 0.01, "kVAh"),  # row 9
    _r("energy_apparent_export", "501C", FC03, 0x501C, "uint64", 2_400_500, 0.01, "kVAh"),      # row 10
    _r("voltage_l1_n", "5B02", FC03, 0x5B02, "uint32", 2301, 0.1, "V"),            # row 28, "Phase voltage L1"
    _r("voltage_l2_n", "5B04", FC03, 0x5B04, "uint32", 2312, 0.1, "V"),            # row 29
    _r("voltage_l3_n", "5B06", FC03, 0x5B06, "uint32", 2295, 0.1, "V"),            # row 30
    _r("voltage_l1_l2", "5B08", FC03, 0x5B08, "uint32", 3986, 0.1, "V"),           # row 31, "L1-L2"
    _r("voltage_l2_l3", "5B0A", FC03, 0x5B0A, "uint32", 3991, 0.1, "V"),           # row 32, "L3-L2"
    _r("voltage_l3_l1", "5B0C", FC03, 0x5B0C, "uint32", 3979, 0.1, "V"),           # row 33, "L1-L3"
    _r("current_l1", "5B10", FC03, 0x5B10, "uint32", 1025, 0.01, "A"),             # row 35
    _r("current_l2", "5B12", FC03, 0x5B12, "uint32", 1150, 0.01, "A"),             # row 36
    _r("current_l3", "5B14", FC03, 0x5B14, "uint32", 975, 0.01, "A"),              # row 37
    _r("current_n", "5B16", FC03, 0x5B16, "uint32", 85, 0.01, "A"),                # row 38
    _r("active_power_total", "5B1A", FC03, 0x5B1A, "int32", 714350, 0.00001, "kW"),    # row 39, 0.01 W
    _r("active_power_l1", "5B1C", FC03, 0x5B1C, "int32", 231050, 0.00001, "kW"),       # row 40
    _r("active_power_l2", "5B1E", FC03, 0x5B1E, "int32", -264525, 0.00001, "kW"),      # row 41
    _r("active_power_l3", "5B20", FC03, 0x5B20, "int32", 218775, 0.00001, "kW"),       # row 42
    _r("reactive_power_total", "5B22", FC03, 0x5B22, "int32", -152050, 0.00001, "kvar"),  # row 43, 0.01 var
    _r("reactive_power_l1", "5B24", FC03, 0x5B24, "int32", -50100, 0.00001, "kvar"),      # row 44
    _r("reactive_power_l2", "5B26", FC03, 0x5B26, "int32", -51200, 0.00001, "kvar"),      # row 45
    _r("reactive_power_l3", "5B28", FC03, 0x5B28, "int32", -50750, 0.00001, "kvar"),      # row 46
    _r("apparent_power_total", "5B2A", FC03, 0x5B2A, "int32", 740025, 0.00001, "kVA"),    # row 47, "Signed"
    _r("apparent_power_l1", "5B2C", FC03, 0x5B2C, "int32", 236420, 0.00001, "kVA"),       # row 48
    _r("apparent_power_l2", "5B2E", FC03, 0x5B2E, "int32", 269430, 0.00001, "kVA"),       # row 49
    _r("apparent_power_l3", "5B30", FC03, 0x5B30, "int32", 224580, 0.00001, "kVA"),       # row 50
    _r("frequency", "5B32", FC03, 0x5B32, "uint16", 5002, 0.01, "Hz"),             # row 51
    _r("power_factor_total", "5B40", FC03, 0x5B40, "int16", -965, 0.001, None),    # row 55
    _r("power_factor_l1", "5B41", FC03, 0x5B41, "int16", 981, 0.001, None),        # row 56
    _r("power_factor_l2", "5B42", FC03, 0x5B42, "int16", -972, 0.001, None),       # row 57
    _r("power_factor_l3", "5B43", FC03, 0x5B43, "int16", 963, 0.001, None),        # row 58
))

# Janitza "frequently required readings" 19000-19120 (function 03, float IEEE 754, high byte/word first).
# Rows 19000-19076 as listed for the UMG 604 by a data-logger vendor (AGG Software, "Janitza (UMG604)"),
# the same positions in Janitza's UMG 96RM address list; 19100/19108 from Janitza's UMG 96-S2 manual p.64.
# None of it from a UMG 604 document of Janitza's own: third-party.
_JZ = "third-party"
JANITZA_UMG604 = MeterMap("janitza_umg604", "Janitza 19000 block (UMG 604 list by AGG Software; UMG 96-S2 p.64)", (
    _r("voltage_l1_n", "19000", FC03, 19000, "float32", 230.4, 1, "V", source=_JZ),
    _r("voltage_l2_n", "19002", FC03, 19002, "float32", 231.5, 1, "V", source=_JZ),
    _r("voltage_l3_n", "19004", FC03, 19004, "float32", 229.6, 1, "V", source=_JZ),
    _r("current_l1", "19012", FC03, 19012, "float32", 15.25, 1, "A", source=_JZ),
    _r("current_l2", "19014", FC03, 19014, "float32", 16.5, 1, "A", source=_JZ),
    _r("current_l3", "19016", FC03, 19016, "float32", 14.75, 1, "A", source=_JZ),
    _r("active_power_l1", "19020", FC03, 19020, "float32", 3450.5, 0.001, "kW", source=_JZ),
    _r("active_power_l2", "19022", FC03, 19022, "float32", 3710.25, 0.001, "kW", source=_JZ),
    _r("active_power_l3", "19024", FC03, 19024, "float32", 3300.75, 0.001, "kW", source=_JZ),
    _r("active_power_total", "19026", FC03, 19026, "float32", 10461.5, 0.001, "kW", source=_JZ),
    _r("apparent_power_total", "19034", FC03, 19034, "float32", 10890.25, 0.001, "kVA", source=_JZ),
    _r("reactive_power_total", "19042", FC03, 19042, "float32", -2100.5, 0.001, "kvar", source=_JZ),
    _r("frequency", "19050", FC03, 19050, "float32", 49.99, 1, "Hz", source=_JZ),
    _r("energy_active_import", "19068", FC03, 19068, "float32", 4567890.0, 0.001, "kWh", source=_JZ),
    _r("energy_active_export", "19076", FC03, 19076, "float32", 123456.0, 0.001, "kWh", source=_JZ),
    _r("energy_reactive_inductive", "19100", FC03, 19100, "float32", 345678.0, 0.001, "kvarh", source=_JZ),
    _r("energy_reactive_capacitive", "19108", FC03, 19108, "float32", 23456.0, 0.001, "kvarh", source=_JZ),
))

# Carlo Gavazzi EM24-DIN, E1 (Ethernet) layout. No E1 protocol document of Carlo Gavazzi's was found. What an EM24
# document confirms: "EM24-DIN PFA, PFB & X models - Communication Protocol" V4R0 (2012-12-03), the RS-485 models'
# document, table 2.3-1 p.8 for 0000h-0016h and 0028h (same addresses, types and weights), function 03 = 04 (p.3)
# and INT32 low word first (2.1, p.7); read from github victronenergy/dbus-cgwacs @ad42ed2. Above 0028h V4R0 has
# other quantities (002Eh DMD W, 0032h-0035h PF, 0037h Hz, 003Eh kWh(+) TOT: profile carlo_gavazzi_em24_rs485),
# so PF 002Eh-0031h, Hz 0033h, kWh(+) TOT 0034h, the per-phase imports and the export are the E1 layout as read
# by mbmd, Victron's dbus-modbus-client and an EM24 emulator: third-party. (Carlo Gavazzi's EM300/ET300
# protocol rev 2.6 p.9 has the same addresses, but that is another product.)
_CG = "third-party"
CARLO_GAVAZZI_EM24 = MeterMap("carlo_gavazzi_em24", "Carlo Gavazzi EM24-DIN PFA/PFB/X protocol V4R0 table 2.3-1 "
                              "p.8 (0000h-0028h); E1 layout above via mbmd", (
    _r("voltage_l1_n", "0000h", FC04, 0x00, "int32", 2301, 0.1, "V", "CDAB"),
    _r("voltage_l2_n", "0002h", FC04, 0x02, "int32", 2312, 0.1, "V", "CDAB"),
    _r("voltage_l3_n", "0004h", FC04, 0x04, "int32", 2295, 0.1, "V", "CDAB"),
    _r("current_l1", "000Ch", FC04, 0x0C, "int32", 10250, 0.001, "A", "CDAB"),
    _r("current_l2", "000Eh", FC04, 0x0E, "int32", 11500, 0.001, "A", "CDAB"),
    _r("current_l3", "0010h", FC04, 0x10, "int32", 97500, 0.001, "A", "CDAB"),
    _r("active_power_l1", "0012h", FC04, 0x12, "int32", 23105, 0.0001, "kW", "CDAB"),
    _r("active_power_l2", "0014h", FC04, 0x14, "int32", -26452, 0.0001, "kW", "CDAB"),
    _r("active_power_l3", "0016h", FC04, 0x16, "int32", 218770, 0.0001, "kW", "CDAB"),
    _r("active_power_total", "0028h", FC04, 0x28, "int32", 215423, 0.0001, "kW", "CDAB"),
    _r("power_factor_l1", "002Eh", FC04, 0x2E, "int16", 981, 0.001, None, source=_CG),
    _r("power_factor_l2", "002Fh", FC04, 0x2F, "int16", -972, 0.001, None, source=_CG),
    _r("power_factor_l3", "0030h", FC04, 0x30, "int16", 963, 0.001, None, source=_CG),
    _r("power_factor_total", "0031h", FC04, 0x31, "int16", 958, 0.001, None, source=_CG),
    _r("frequency", "0033h", FC04, 0x33, "int16", 500, 0.1, "Hz", source=_CG),
    _r("energy_active_import", "0034h", FC04, 0x34, "int32", 1234567, 0.1, "kWh", "CDAB", _CG),
    _r("energy_active_import_l1", "0040h", FC04, 0x40, "int32", 411522, 0.1, "kWh", "CDAB", _CG),
    _r("energy_active_import_l2", "0042h", FC04, 0x42, "int32", 411523, 0.1, "kWh", "CDAB", _CG),
    _r("energy_active_import_l3", "0044h", FC04, 0x44, "int32", 411524, 0.1, "kWh", "CDAB", _CG),
    _r("energy_active_export", "004Eh", FC04, 0x4E, "int32", 98765, 0.1, "kWh", "CDAB", _CG),
))

# Carlo Gavazzi "EM24-DIN PFA, PFB & X models - Communication Protocol" V4R0 (2012-12-03), table 2.3-1
# "Instantaneous variables and meters" p.8 (every row below; "read only mode with functions code 03 and 04", the
# two "have exactly the same effect", p.3), INT32 word order LSW -> MSW (2.1, p.7). Weights as printed: Volt*10,
# Ampere*1000, Watt*10, VA*10, var*10, PF*1000, Hz*10, kWh*10, kvarh*10. Read from the public copy in github
# victronenergy/dbus-cgwacs @ad42ed2, documents/AcSensors/EM24_PFA_PFB_X-CP V4R0 ENG 031212.pdf.
CARLO_GAVAZZI_EM24_RS485 = MeterMap("carlo_gavazzi_em24_rs485", "Carlo Gavazzi EM24-DIN PFA, PFB & X models "
                                    "Communication Protocol V4R0, table 2.3-1 p.8", (
    _r("voltage_l1_n", "300001 / 0000h", FC04, 0x00, "int32", 2301, 0.1, "V", "CDAB"),       # V L1-N, p.8
    _r("voltage_l2_n", "300003 / 0002h", FC04, 0x02, "int32", 2312, 0.1, "V", "CDAB"),       # V L2-N, p.8
    _r("voltage_l3_n", "300005 / 0004h", FC04, 0x04, "int32", 2295, 0.1, "V", "CDAB"),       # V L3-N, p.8
    _r("voltage_l1_l2", "300007 / 0006h", FC04, 0x06, "int32", 3986, 0.1, "V", "CDAB"),      # V L1-L2, p.8
    _r("voltage_l2_l3", "300009 / 0008h", FC04, 0x08, "int32", 3991, 0.1, "V", "CDAB"),      # V L2-L3, p.8
    _r("voltage_l3_l1", "300011 / 000Ah", FC04, 0x0A, "int32", 3979, 0.1, "V", "CDAB"),      # V L3-L1, p.8
    _r("current_l1", "300013 / 000Ch", FC04, 0x0C, "int32", 10250, 0.001, "A", "CDAB"),      # A L1, p.8
    _r("current_l2", "300015 / 000Eh", FC04, 0x0E, "int32", 11500, 0.001, "A", "CDAB"),      # A L2, p.8
    _r("current_l3", "300017 / 0010h", FC04, 0x10, "int32", 97500, 0.001, "A", "CDAB"),      # A L3, p.8
    _r("active_power_l1", "300019 / 0012h", FC04, 0x12, "int32", 23105, 0.0001, "kW", "CDAB"),     # W L1, p.8
    _r("active_power_l2", "300021 / 0014h", FC04, 0x14, "int32", -26452, 0.0001, "kW", "CDAB"),    # W L2, p.8
    _r("active_power_l3", "300023 / 0016h", FC04, 0x16, "int32", 218770, 0.0001, "kW", "CDAB"),    # W L3, p.8
    _r("apparent_power_l1", "300025 / 0018h", FC04, 0x18, "int32", 23642, 0.0001, "kVA", "CDAB"),   # VA L1, p.8
    _r("apparent_power_l2", "300027 / 001Ah", FC04, 0x1A, "int32", 26943, 0.0001, "kVA", "CDAB"),   # VA L2, p.8
    _r("apparent_power_l3", "300029 / 001Ch", FC04, 0x1C, "int32", 224580, 0.0001, "kVA", "CDAB"),  # VA L3, p.8
    _r("reactive_power_l1", "300031 / 001Eh", FC04, 0x1E, "int32", -5010, 0.0001, "kvar", "CDAB"),  # VAR L1, p.8
    _r("reactive_power_l2", "300033 / 0020h", FC04, 0x20, "int32", 5120, 0.0001, "kvar", "CDAB"),   # VAR L2, p.8
    _r("reactive_power_l3", "300035 / 0022h", FC04, 0x22, "int32", -50750, 0.0001, "kvar", "CDAB"),  # VAR L3, p.8
    _r("active_power_total", "300041 / 0028h", FC04, 0x28, "int32", 215423, 0.0001, "kW", "CDAB"),   # W sum, p.8
    _r("apparent_power_total", "300043 / 002Ah", FC04, 0x2A, "int32", 275165, 0.0001, "kVA", "CDAB"),  # VA sum
    _r("reactive_power_total", "300045 / 002Ch", FC04, 0x2C, "int32", -50640, 0.0001, "kvar", "CDAB"),  # VAR sum
    _r("demand_active_power", "300047 / 002Eh", FC04, 0x2E, "int32", 198760, 0.0001, "kW", "CDAB"),  # DMD W sum
    _r("power_factor_l1", "300051 / 0032h", FC04, 0x32, "int16", 981, 0.001, None),          # PF L1, p.8
    _r("power_factor_l2", "300052 / 0033h", FC04, 0x33, "int16", -972, 0.001, None),         # PF L2 (lead), p.8
    _r("power_factor_l3", "300053 / 0034h", FC04, 0x34, "int16", 963, 0.001, None),          # PF L3, p.8
    _r("power_factor_total", "300054 / 0035h", FC04, 0x35, "int16", 958, 0.001, None),       # PF sum, p.8
    _r("frequency", "300056 / 0037h", FC04, 0x37, "int16", 499, 0.1, "Hz"),                  # Hz, p.8
    _r("demand_active_power_max", "300057 / 0038h", FC04, 0x38, "int32", 251230, 0.0001, "kW", "CDAB"),  # DMD W max
    _r("energy_active_import", "300063 / 003Eh", FC04, 0x3E, "int32", 1234567, 0.1, "kWh", "CDAB"),  # kWh(+) TOT
    _r("energy_reactive_import", "300065 / 0040h", FC04, 0x40, "int32", 234567, 0.1, "kvarh", "CDAB"),  # kvarh(+)
    _r("energy_active_import_l1", "300071 / 0046h", FC04, 0x46, "int32", 411522, 0.1, "kWh", "CDAB"),  # kWh(+) L1
    _r("energy_active_import_l2", "300073 / 0048h", FC04, 0x48, "int32", 411523, 0.1, "kWh", "CDAB"),  # kWh(+) L2
    _r("energy_active_import_l3", "300075 / 004Ah", FC04, 0x4A, "int32", 411524, 0.1, "kWh", "CDAB"),  # kWh(+) L3
    _r("energy_active_export", "300093 / 005Ch", FC04, 0x5C, "int32", 98765, 0.1, "kWh", "CDAB"),  # kWh(-) TOT
    _r("energy_reactive_export", "300095 / 005Eh", FC04, 0x5E, "int32", 8765, 0.1, "kvarh", "CDAB"),  # kvarh(-)
))

# "RS485 TVOC Sensor (multi-parameter air quality board)" datasheet layout as transcribed in
# Isuromu/Telemetry-Weather-station-system docs/protocols: holding registers, one scaled integer each.
_ENV = "third-party"
GENERIC_ENV_SENSOR = MeterMap("generic_env_sensor", "RS485 TVOC multi-parameter board datasheet (transcription)", (
    _r("humidity", "0x0000", FC03, 0, "uint16", 553, 0.1, "%RH", source=_ENV),
    _r("temperature", "0x0001", FC03, 1, "int16", -125, 0.1, "°C", source=_ENV),
    _r("pm2_5", "0x0004", FC03, 4, "uint16", 37, 1, "µg/m³", source=_ENV),
    _r("co2", "0x0005", FC03, 5, "uint16", 812, 1, "ppm", source=_ENV),
    _r("tvoc", "0x0006", FC03, 6, "uint16", 245, 0.001, "ppm", source=_ENV),
    _r("pm10", "0x0009", FC03, 9, "uint16", 58, 1, "µg/m³", source=_ENV),
))

# ELT Sensor "MB-350U-C" manual, 2 Modbus Protocol, 2.1 Hold Register Specifications, printed p.10 (copy read:
# manualshive elt-sensor/mb-350u-c 2396938, page 11): "Mapping Base Address : 0x0050", "Register Address" in
# hex, function 03 only (2.2), "2 Byte Integer" (CO2, temperature) or "2 Byte WORD" (humidity, CO). The
# temperature is served below 0 ℃, so a profile reading it unsigned fails.
ELT_MB350UC = MeterMap("elt_mb350uc", "ELT Sensor MB-350U-C manual, 2.1 Hold Register Specifications, p.10", (
    _r("co2", "0x0050", FC03, 0x0050, "int16", 812, 1, "ppm"),            # Co2, PPM, "800 -> 800 PPM", p.10
    _r("temperature", "0x0051", FC03, 0x0051, "int16", -103, 0.1, "°C"),  # "255 -> 255 / 10 : 25.5 ℃", p.10
    _r("humidity", "0x0052", FC03, 0x0052, "uint16", 75, 1, "%RH"),       # Humidity, %, "75 -> 75%", p.10
    _r("co", "0x0053", FC03, 0x0053, "uint16", 25, 1, "ppm"),             # CO, PPM, "25 -> 25 PPM", p.10
))

# E+E Elektronik "User Manual EE072 Humidity and Temperature Probe with Modbus RTU", 5.2, INTEGER (read
# register) table p.9: register number, register address (hex), scale 100; function 03 / 04.
EPLUSE_EE072 = MeterMap("epluse_ee072", "E+E User Manual EE072, 5.2 INTEGER read registers, p.9", (
    _r("temperature", "4002 (0xFA1)", FC03, 0xFA1, "int16", -1234, 0.01, "°C"),
    _r("humidity", "4011 (0xFAA)", FC03, 0xFAA, "int16", 4567, 0.01, "%RH"),
    _r("dew_point", "4053 (0xFD4)", FC03, 0xFD4, "int16", -2890, 0.01, "°C"),
))

# E+E Elektronik "User Manual EE872 Modular Probe for CO2, RH, T and p", 5.2.2, Tab. 3 Integer values (read
# register) p.10: CO2 scale 1, pressure (mbar) scale 10, RH/T/Td scale 100; function 03 / 04.
EPLUSE_EE872 = MeterMap("epluse_ee872", "E+E User Manual EE872, 5.2.2 Tab. 3, p.10", (
    _r("co2", "4031 (0xFBE)", FC03, 0xFBE, "int16", 1288, 1, "ppm"),
    _r("pressure", "4101 (0x1004)", FC03, 0x1004, "int16", 10132, 0.1, "hPa"),
    _r("humidity", "4011 (0xFAA)", FC03, 0xFAA, "int16", 5123, 0.01, "%RH"),
    _r("temperature", "4002 (0xFA1)", FC03, 0xFA1, "int16", 2195, 0.01, "°C"),
    _r("dew_point", "4053 (0xFD4)", FC03, 0xFD4, "int16", 1142, 0.01, "°C"),
))

# Delta OHM operating manual "PM[B]sense" V1.3, 6 MODBUS-RTU PROTOCOL, Input Registers p.15 (the same
# addresses in "PMsense" V1.0 p.15, number = address + 1): "PM2.5 in µg/m3 (x10)", "16-bit Integer"; the
# table gives the 0-based address; function 04 (Input Registers).
DELTA_OHM_PMSENSE = MeterMap("delta_ohm_pmsense", "Delta OHM PM[B]sense manual V1.3, 6 Input Registers, p.15", (
    _r("pm1_0", "3", FC04, 3, "int16", 87, 0.1, "µg/m³"),     # PM1.0 in µg/m3 (x10), p.15
    _r("pm2_5", "4", FC04, 4, "int16", 253, 0.1, "µg/m³"),    # PM2.5 in µg/m3 (x10), p.15
    _r("pm10", "5", FC04, 5, "int16", 418, 0.1, "µg/m³"),     # PM10 in µg/m3 (x10), p.15
))

# Vaisala "GMP252 User Guide" M211897EN-D, Appendix A: Table 52 Measurement Data Registers p.113 (register
# number, address in hex, 32-bit float, unit); registers numbered from 1; function 03 (Table 51, no 04);
# floats least significant word first (A.3 example p.118: 43E8D47Ah sent as D47A 43E8).
VAISALA_GMP252 = MeterMap("vaisala_gmp252", "Vaisala GMP252 User Guide M211897EN-D, Table 52, p.113", (
    _r("co2", "1 (0000hex)", FC03, 0x0000, "float32", 465.66, 1, "ppm", "CDAB"),     # Measured CO2 value, p.113
    _r("temperature", "5 (0004hex)", FC03, 0x0004, "float32", 23.75, 1, "°C", "CDAB"),  # Measured T, p.113
))

# Vaisala "HMDW110 User Guide" M211726EN-D, Appendix A: Table 51 Modbus Measurement Data Registers p.79 (register
# number in decimal, address in hex, 32-bit float, unit; numbered from 1); function codes Table 50 p.78 (03, 16,
# 43/14: no 04); floats least significant word first at the listed register (A.3, p.78). The same Table 51 is in
# Vaisala's "HMDW110 Quick Guide" M211692EN-D on docs.vaisala.com. Raw values from Vaisala's own example of a
# measurement message ("send 5 T= 22.8 'C RH= 39.8 %RH Td= 8.4 'C Tw= 14.6 'C", user guide M211726EN-F,
# "Measurement output", docs.vaisala.com), so they agree with each other as one moment of real air.
VAISALA_HMDW110 = MeterMap("vaisala_hmdw110", "Vaisala HMDW110 User Guide M211726EN-D, Table 51, p.79", (
    _r("humidity", "1 (0000hex)", FC03, 0x0000, "float32", 39.8, 1, "%RH", "CDAB"),   # Relative humidity, p.79
    _r("temperature", "3 (0002hex)", FC03, 0x0002, "float32", 22.8, 1, "°C", "CDAB"),  # Temperature, p.79
    _r("dew_frost_point", "9 (0008hex)", FC03, 0x0008, "float32", 8.4, 1, "°C", "CDAB"),  # Dew/frost point, p.79
    _r("wet_bulb_temperature", "19 (0012hex)", FC03, 0x0012, "float32", 14.6, 1, "°C", "CDAB"),  # Wet bulb, p.79
))

# Schneider Electric Korea "EOCR-iSEM2 Register map" Rev. 1.4.0 (2025-02-10, RD24-03-005), sheet "Map": the
# "Address" column in decimal, function 03 (row 3: "supports the following MODBUS function codes 03, 06, 16"), every
# register typed u16; a 32-bit value is a ": MSB" row followed by its ": LSB" row (high word first). Units as printed:
# 0.01 A, 0.1 V, 0.1 Hz, 0.01 (PF), 1 W, 1 Var, 0.01 kWh, 0.01 kVARh, 0.1 hour. Bit fields from the cells' notes
# (column L). Read from the public copy in github uptec-ai/RlcLoadBank_Separate @c71de1f, Document/통신자료/. The
# sheet's Excel row follows each entry. The raw values are one running moment of a 440 V motor of about 480 kW on
# an external CT, caught starting into a stall trip (status 8086h: System On, System Fault, Motor Running, Motor
# starting; fault number 9, FLT_LONG_START), so the 32-bit values have both words set and each bit its neighbours
# cleared or set the other way.
_EOCR_STATUS = 0x8086  # Reg455 bits 1, 2, 7, 15
SCHNEIDER_EOCR_ISEM2 = MeterMap("schneider_eocr_isem2", "Schneider EOCR-iSEM2 Register map Rev. 1.4.0, sheet Map", (
    _r("run_hours_total", "119", FC03, 119, "uint32", 456_789, 0.1, "h"),             # rows 42-43, 0.1 hour
    _r("contactor_operations", "132", FC03, 132, "uint32", 87_654, 1, None),          # rows 46-47, MC ON/OFF count
    _r("energy_active_import", "143", FC03, 143, "uint32", 123_456_789, 0.01, "kWh"),     # rows 51-52, 0.01 kWh
    _r("energy_reactive_import", "145", FC03, 145, "uint32", 45_678_901, 0.01, "kvarh"),  # rows 53-54, 0.01 kVARh
    _r("trip_code", "451", FC03, 451, "uint16", 9, 1, None),                          # row 121, Fault number
    _r("motor_running", "455.1", FC03, 455, "bool", _EOCR_STATUS, 1, None, bit=1),    # row 125, System On
    _r("motor_trip", "455.2", FC03, 455, "bool", _EOCR_STATUS, 1, None, bit=2),       # row 125, System Fault
    _r("motor_starting", "455.15", FC03, 455, "bool", _EOCR_STATUS, 1, None, bit=15),  # row 125, Motor starting
    _r("warning_status_1", "462", FC03, 462, "uint16", 0x0080, 1, None),              # row 130, under current
    _r("warning_status_2", "463", FC03, 463, "uint16", 0x0400, 1, None),              # row 131, under voltage
    _r("frequency", "474", FC03, 474, "uint16", 600, 0.1, "Hz"),                      # row 138, Frequency of Voltage
    _r("voltage_ll_avg", "476", FC03, 476, "uint16", 4405, 0.1, "V"),                 # row 139, Average Voltage
    _r("voltage_l3_l1", "477", FC03, 477, "uint16", 4398, 0.1, "V"),                  # row 140, L3-L1 Voltage
    _r("voltage_l1_l2", "478", FC03, 478, "uint16", 4402, 0.1, "V"),                  # row 141, L1-L2 Voltage
    _r("voltage_l2_l3", "479", FC03, 479, "uint16", 4415, 0.1, "V"),                  # row 142, L2-L3 Voltage
    _r("power_factor_total", "481", FC03, 481, "uint16", 87, 0.01, None),             # row 144, PowerFactor 0.01
    _r("power_factor_leading", "482", FC03, 482, "bool", 0, 1, None, bit=0),          # row 145, 0 lag / 1 lead
    _r("active_power_total", "486", FC03, 486, "uint32", 476_612, 0.001, "kW"),       # rows 149-150, 1 W
    _r("reactive_power_total", "488", FC03, 488, "uint32", 270_105, 0.001, "kvar"),   # rows 151-152, 1 Var
    _r("current_avg", "500", FC03, 500, "uint32", 71_883, 0.01, "A"),                 # rows 154-155, Avg Rms Current
    _r("current_l1", "502", FC03, 502, "uint32", 71_825, 0.01, "A"),                  # rows 156-157
    _r("current_l2", "504", FC03, 504, "uint32", 72_250, 0.01, "A"),                  # rows 158-159
    _r("current_l3", "506", FC03, 506, "uint32", 71_575, 0.01, "A"),                  # rows 160-161
))

MAPS: dict[str, MeterMap] = {m.profile: m for m in (
    ELT_MB350UC,
    EASTRON_SDM630, LS_GIMAC1000, LS_GIMAC1000_EX, ROOTECH_ACCURA2350, SCHNEIDER_PM5500, ABB_M4M30, JANITZA_UMG604,
    CARLO_GAVAZZI_EM24, CARLO_GAVAZZI_EM24_RS485, GENERIC_ENV_SENSOR, EPLUSE_EE072, EPLUSE_EE872,
    DELTA_OHM_PMSENSE, VAISALA_GMP252, VAISALA_HMDW110, SCHNEIDER_EOCR_ISEM2)}
