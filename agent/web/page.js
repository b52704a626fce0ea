// The status page: asks page.json every REFRESH_MS while the tab is visible and draws it. No framework and
// nothing from the internet; every value goes into the page as text (textContent), never as HTML, since
// device strings and error messages come from the plant.
"use strict";

const REFRESH_MS = 1500;
const LANG_KEY = "edge-agent.lang";

const LABELS = {
  en: {
    lang_button: "한국어", loading: "loading", offline: "The agent does not answer: the figures below are stale.",
    updated: "updated", all_ok: "all OK", attention: "attention",
    gateway: "Gateway", id: "ID", site: "Site", version: "Version", uptime: "Uptime", now: "Gateway time",
    clock: "Clock", clock_synced: "synchronised", clock_unsynced: "NOT synchronised", clock_unknown: "unknown",
    clock_error: "estimated error", clock_steps: "steps",
    uplink: "Uplink (MQTT)", connected: "connected", disconnected: "disconnected", broker: "Broker", tls: "TLS",
    connected_since: "Connected since", inflight: "In flight (awaiting PUBACK)", delivered: "Delivered readings",
    last_error: "Last error", yes: "yes", no: "no",
    buffer: "Buffer", waiting: "Waiting readings", oldest: "Oldest", on_disk: "On disk", cap: "cap",
    on_full: "At the cap", lost: "Lost", dropped_oldest: "dropped (oldest)", rejected: "rejected at the cap",
    unstored: "not stored (disk full)", refused: "refused by the broker",
    expired: "expired (max_age)", lost_since: "lost since last status", next_seq: "Next sequence number",
    lines: "Shared lines", line: "Line", utilisation: "Busy", requests: "Requests", timeouts: "Timeouts",
    queue: "Queue", crc_errors: "CRC errors", framing_errors: "Framing errors", discarded: "Discarded replies",
    disconnects: "Disconnects",
    devices: "Devices", state_ok: "OK", state_failing: "NOT ANSWERING", state_starting: "starting",
    last_success: "Last good poll", last_poll: "Poll took", polls: "Polls ok / failed", interval: "every",
    bad_readings: "bad readings", overruns: "skipped ticks", no_values: "no values yet",
    stale: "The values below are from the last good poll.",
    point: "Point", value: "Value", unit: "Unit", quality: "Quality", at: "At",
    good: "good", bad: "bad", uncertain: "uncertain",
    energy: "Energy and demand", streams: "Latest windows",
    meters: "Meters", windows: "Windows closed since start", alarms_active: "Alarm levels raised",
    kind_meter: "meter", kind_group: "group", alarm_normal: "normal", alarm_raised: "ALARM", alarm_waiting: "waiting",
    alarm_settling: "settling",
    window: "Window", left: (d) => `${d} left`, window_ended: "ended with no reading since: is the meter answering?",
    so_far: "Energy so far", power_now: "Power now", projected: "Projected demand at the window's end",
    target: "Target", levels: "levels", no_target: "no target", raised: "Raised", none: "none",
    settling: (d) => `none yet: alarms are decided in ${d}, once the power is measured long enough`,
    last_reading: "Last counter reading",
    waiting_first: (at) => `Live demand from the counter's second reading (window until ${at}).`,
    estimated: (d) => `first ${d} of this window estimated from the present power (no reading before it: the first window after start-up; this window is not sent)`,
    waiting_group: "Waiting for every meter of the group in the same window.",
    waiting_reading: "No counter reading yet.",
    start: "Start", demand: "Demand", energy_kwh: "Energy", coverage: "Coverage", flags: "Flags",
    no_windows: "No window closed yet.",
    flag_none: "complete", flag_edge_gap: "edge interpolated across a gap", flag_wrap: "counter wrapped",
    flag_reset: "counter reset", flag_replacement: "meter replaced? (estimated)",
    flag_clock_unsynced: "clock not synchronised", flag_clock_step: "clock stepped",
    flag_restart: "agent restarted in the window", flag_export_unread: "export counter not read (export short)", flag_coverage: (p, g) => `readings missing: ${p} covered, longest gap ${g}`,
    ago: (s) => `${s} ago`, never: "never",
  },
  ko: {
    lang_button: "English", loading: "불러오는 중", offline: "에이전트가 응답하지 않습니다: 아래 값은 최신이 아닙니다.",
    updated: "갱신", all_ok: "모두 정상", attention: "확인 필요",
    gateway: "게이트웨이", id: "ID", site: "사이트", version: "버전", uptime: "가동 시간", now: "게이트웨이 시각",
    clock: "시계", clock_synced: "동기화됨", clock_unsynced: "동기화 안 됨", clock_unknown: "알 수 없음",
    clock_error: "추정 오차", clock_steps: "시각 점프",
    uplink: "상위 전송 (MQTT)", connected: "연결됨", disconnected: "연결 끊김", broker: "브로커", tls: "TLS",
    connected_since: "연결 시각", inflight: "전송 중 (PUBACK 대기)", delivered: "전달된 측정값",
    last_error: "마지막 오류", yes: "예", no: "아니오",
    buffer: "버퍼", waiting: "대기 중인 측정값", oldest: "가장 오래된 값", on_disk: "디스크 사용량", cap: "상한",
    on_full: "상한 도달 시", lost: "손실", dropped_oldest: "삭제 (오래된 값)", rejected: "상한에서 거부",
    unstored: "저장 못 함 (디스크 가득)", refused: "브로커가 거부",
    expired: "만료 (max_age)", lost_since: "지난 상태 보고 이후 손실", next_seq: "다음 일련번호",
    lines: "공유 통신 회선", line: "회선", utilisation: "사용률", requests: "요청", timeouts: "응답 없음",
    queue: "대기열", crc_errors: "CRC 오류", framing_errors: "프레임 오류", discarded: "버린 응답",
    disconnects: "연결 끊김",
    devices: "장치", state_ok: "정상", state_failing: "응답 없음", state_starting: "시작 중",
    last_success: "마지막 정상 수집", last_poll: "수집 소요", polls: "수집 성공 / 실패", interval: "주기",
    bad_readings: "불량 측정값", overruns: "건너뛴 주기", no_values: "아직 값 없음",
    stale: "아래 값은 마지막 정상 수집 때의 값입니다.",
    point: "포인트", value: "값", unit: "단위", quality: "품질", at: "시각",
    good: "양호", bad: "불량", uncertain: "불확실",
    energy: "에너지·수요전력", streams: "최근 수요 구간",
    meters: "계량기", windows: "시작 이후 마감된 구간", alarms_active: "발령 중인 경보 단계",
    kind_meter: "계량기", kind_group: "합계 그룹", alarm_normal: "정상", alarm_raised: "경보", alarm_waiting: "대기 중",
    alarm_settling: "판정 대기",
    window: "수요 구간", left: (d) => `${d} 남음`, window_ended: "이후 측정값 없이 구간이 끝남: 계량기 응답을 확인하세요",
    so_far: "구간 누적 전력량", power_now: "현재 전력", projected: "구간 종료 시 예측 수요전력",
    target: "목표 수요전력", levels: "경보 단계", no_target: "목표 없음", raised: "발령된 경보", none: "없음",
    settling: (d) => `아직 없음: 전력을 충분히 측정한 ${d} 후부터 경보를 판정합니다`,
    last_reading: "마지막 적산값 수집",
    waiting_first: (at) => `전력량계 두 번째 측정부터 실시간 수요 표시 (구간 종료 ${at}).`,
    estimated: (d) => `이 구간의 처음 ${d}은 현재 전력으로 추정한 값입니다 (시작 후 첫 구간: 그 전 측정값이 없어 이 구간은 전송하지 않습니다)`,
    waiting_group: "그룹의 모든 계량기가 같은 구간 값을 보내기를 기다리는 중.",
    waiting_reading: "아직 적산값 수집 없음.",
    start: "시작", demand: "수요전력", energy_kwh: "전력량", coverage: "수집률", flags: "상태",
    no_windows: "아직 마감된 구간 없음.",
    flag_none: "정상", flag_edge_gap: "경계 보간 (수집 공백)", flag_wrap: "적산값 순환 (wrap)",
    flag_reset: "적산값 초기화", flag_replacement: "계량기 교체 추정 (추정값)",
    flag_clock_unsynced: "시계 동기화 안 됨", flag_clock_step: "시각 점프",
    flag_restart: "구간 중 에이전트 재시작", flag_export_unread: "역방향 전력량 미수집 (송전량 누락)", flag_coverage: (p, g) => `측정값 누락: 수집률 ${p}, 최장 공백 ${g}`,
    ago: (s) => `${s} 전`, never: "없음",
  },
};

let lang = chooseLanguage();
let last = null;       // the last snapshot drawn, redrawn when the language changes
let timer = null;
let inFlight = false;

function chooseLanguage() {
  try {
    const kept = window.localStorage.getItem(LANG_KEY);
    if (kept === "ko" || kept === "en") return kept;
  } catch (e) { /* storage refused (private mode): the browser's language decides */ }
  return (navigator.language || "en").toLowerCase().startsWith("ko") ? "ko" : "en";
}

function t(key) { return LABELS[lang][key] ?? key; }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function badge(cls, text) { return el("span", { class: `badge ${cls}` }, text); }

function fields(id, rows) {
  const dl = document.getElementById(id);
  dl.replaceChildren(...rows.filter(Boolean).flatMap(([label, value]) => [el("dt", null, label), el("dd", null, value)]));
}

function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  const units = lang === "ko" ? ["일", "시간", "분", "초"] : ["d", "h", "min", "s"];
  const parts = [[Math.floor(seconds / 86400), units[0]], [Math.floor(seconds / 3600) % 24, units[1]],
    [Math.floor(seconds / 60) % 60, units[2]], [seconds % 60, units[3]]];
  const first = parts.findIndex(([n]) => n > 0);
  return first < 0 ? `0 ${units[3]}` : parts.slice(first, first + 2).map(([n, u]) => `${n} ${u}`).join(" ");
}

// The browser's local time, written the same in both languages: 2026-12-04 17:13:51.
function stamp(date) {
  const two = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())} ` +
    `${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}`;
}

function when(iso, now) {
  if (!iso) return t("never");
  const at = new Date(iso);
  return `${stamp(at)} (${t("ago")(duration((now - at.getTime()) / 1000))})`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function number(n) { return typeof n === "number" ? n.toLocaleString(lang === "ko" ? "ko-KR" : "en-US") : n; }

function text(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "object") return JSON.stringify(value);
  return typeof value === "number" ? number(value) : String(value);
}

// Keys some stages add (clock health, energy figures, buffer states) drawn as they are.
function extraRows(object, known) {
  return Object.entries(object || {}).filter(([key]) => !known.includes(key)).map(([key, value]) => [key, text(value)]);
}

function drawGateway(data, now) {
  const g = data.gateway;
  document.getElementById("gateway-name").textContent = `${g.id} · ${g.site}`;
  document.title = `${g.id} – edge-agent`;
  const rows = [[t("id"), g.id], [t("site"), g.site], [t("version"), g.version], [t("uptime"), duration(g.uptime_s)],
    [t("now"), stamp(new Date(data.now))]];
  const clock = g.clock;
  if (clock) {
    let state = badge("warn", t("clock_unknown"));
    if (clock.known !== false && clock.synchronised !== undefined) {
      state = clock.synchronised ? badge("ok", t("clock_synced")) : badge("bad", t("clock_unsynced"));
    }
    const detail = [];
    if (typeof clock.esterror_s === "number") detail.push(`${t("clock_error")} ${(clock.esterror_s * 1000).toFixed(1)} ms`);
    if (typeof clock.steps === "number") detail.push(`${t("clock_steps")} ${clock.steps}`);
    rows.push([t("clock"), el("span", null, state, detail.length ? ` ${detail.join(", ")}` : "")]);
    rows.push(...extraRows(clock, ["known", "synchronised", "esterror_s", "steps"]));
  }
  fields("gateway-fields", rows);
}

function drawUplink(u, now) {
  const state = document.getElementById("uplink-state");
  state.className = `badge ${u.connected ? "connected" : "disconnected"}`;
  state.dataset.state = u.connected ? "connected" : "disconnected";
  state.textContent = t(u.connected ? "connected" : "disconnected");
  fields("uplink-fields", [
    [t("broker"), `${u.broker}${u.tls ? " (TLS)" : ""}`],
    [t("connected_since"), u.connected ? when(u.connected_since, now) : "–"],
    [t("inflight"), number(u.inflight)],
    [t("delivered"), number(u.delivered_readings)],
    u.last_error ? [t("last_error"), el("span", { class: u.connected ? "" : "error-text", id: "uplink-error" },
      `${u.last_error} — ${when(u.last_error_at, now)}`)] : null,
  ]);
}

function drawBuffer(b) {
  const causes = ["dropped_oldest", "rejected", "expired", "unstored", "refused"];  // buffer/store.py LOSS_REASONS
  const lost = causes.reduce((sum, cause) => sum + (b[cause] || 0), 0);
  const share = b.max_bytes ? ` / ${bytes(b.max_bytes)} ${t("cap")} (${(100 * b.bytes / b.max_bytes).toFixed(1)} %)` : "";
  fields("buffer-fields", [
    [t("waiting"), number(b.readings)],
    [t("oldest"), b.oldest_ts ? `${stamp(new Date(b.oldest_ts))} (${t("ago")(duration(b.oldest_age_s))})` : "–"],
    [t("on_disk"), `${bytes(b.bytes)}${share}`],
    [t("on_full"), b.on_full],
    [t("lost"), el("span", { class: lost ? "error-text" : "" },
      `${number(lost)} (` + causes.map((cause) => `${t(cause)} ${number(b[cause] || 0)}`).join(", ") + ")")],
    [t("lost_since"), number(b.lost_since_last_status)],
    ...extraRows(b, ["buffer_id", "readings", "rows", "bytes", "oldest_ts", "oldest_age_s", "next_seq", "dropped_oldest",
      "rejected", "expired", "unstored", "refused", "lost_since_last_status", "max_bytes", "on_full", "max_age_s"]),
  ]);
}

function drawLines(lines) {
  const section = document.getElementById("lines");
  section.hidden = !lines.length;
  if (!lines.length) return;
  const head = ["line", "utilisation", "requests", "timeouts", "queue", "crc_errors", "framing_errors", "discarded",
    "disconnects"];
  const rows = lines.map((line) => {
    const discarded = line.discarded ? Object.values(line.discarded).reduce((a, b) => a + b, 0) : undefined;
    const busy = line.utilisation;
    return el("tr", { "data-line": line.line },
      el("td", null, line.line),
      el("td", { class: `num${busy >= 0.9 ? " error-text" : ""}` }, `${(100 * busy).toFixed(0)} %`),
      ...[line.requests, line.timeouts, line.queue, line.crc_errors, line.framing_errors, discarded, line.disconnects]
        .map((v) => el("td", { class: "num" }, text(v))));
  });
  document.getElementById("lines-table").replaceChildren(
    el("thead", null, el("tr", null, ...head.map((k) => el("th", null, t(k))))), el("tbody", null, ...rows));
}

function pointsTable(points) {
  if (!points.length) return el("p", { class: "muted" }, t("no_values"));
  const rows = points.map((p) => el("tr", { class: p.quality === "good" ? "" : "bad-point", "data-point": p.point },
    el("td", null, p.point),
    el("td", { class: "num value" }, text(p.value)),
    el("td", null, p.unit || ""),
    el("td", null, badge(p.quality, t(p.quality)), p.reason ? el("span", { class: "reason" }, p.reason) : null)));
  return el("div", { class: "scroll" }, el("table", null,
    el("thead", null, el("tr", null, ...["point", "value", "unit", "quality"].map((k) => el("th", null, t(k))))),
    el("tbody", null, ...rows)));
}

function drawDevices(devices, now) {
  const cards = devices.map((d) => {
    const state = d.state || "starting";
    return el("article", { class: "card device", "data-device": d.name, "data-state": state },
      el("div", { class: "device-head" }, el("h3", null, d.name),
        el("span", { class: `badge state ${state}` }, t(`state_${state}`))),
      el("dl", { class: "facts" },
        el("dt", null, t("last_success")), el("dd", { class: "last-success" }, when(d.last_success, now)),
        el("dt", null, t("last_poll")), el("dd", null, `${d.last_poll_ms ?? "–"} ms (${d.driver}, ${t("interval")} ${d.poll_interval_s} s)`),
        el("dt", null, t("polls")), el("dd", null, `${number(d.polls_ok)} / ${number(d.polls_failed)}` +
          (d.bad_readings ? `, ${t("bad_readings")} ${number(d.bad_readings)}` : "") +
          (d.overruns ? `, ${t("overruns")} ${number(d.overruns)}` : "")),
        d.last_error ? el("dt", null, t("last_error")) : null,
        d.last_error ? el("dd", { class: "error-text last-error" }, d.last_error) : null),
      state === "failing" && (d.points || []).length ? el("p", { class: "stale-note" }, t("stale")) : null,
      pointsTable(d.points || []));
  });
  document.getElementById("devices").replaceChildren(...cards);
}

// A window's local wall-clock time as the meter's zone writes it ("2026-12-04T17:15:00+09:00" -> "12-04 17:15"):
// demand windows are billed on that clock, whatever the browser's zone.
function wallClock(iso, seconds) {
  if (!iso) return "–";
  return `${iso.slice(5, 10)} ${iso.slice(11, seconds ? 19 : 16)}`;
}

// The meter's zone when the browser's differs at that instant (a laptop set to UTC): "UTC+09:00", else "".
function zoneNote(iso) {
  const offset = iso ? iso.slice(19) : "";
  if (!/^[+-]\d\d:\d\d$/.test(offset)) return "";
  const minutes = (offset[0] === "-" ? -1 : 1) * (60 * Number(offset.slice(1, 3)) + Number(offset.slice(4, 6)));
  return -new Date(iso).getTimezoneOffset() === minutes ? "" : `UTC${offset}`;
}

function kw(n) { return typeof n === "number" ? `${number(Math.round(n * 10) / 10)} kW` : "–"; }

function flagWords(w) {
  const words = (w.flags || []).map((f) => t(`flag_${f}`));
  if (w.coverage < 0.999) {
    words.push(t("flag_coverage")(`${(100 * w.coverage).toFixed(1)} %`, duration(w.longest_gap_s)));
  }
  return words.length ? words.join("; ") : t("flag_none");
}

// No level raised, and none decided yet: the present power is not yet a slope long enough (after a start).
function settling(m) { return m.live && m.live.settling_s > 0 && m.levels_kw.length > 0; }

// The alarm's state in words and colour: none raised, some levels (warn), the top level (bad).
function alarmBadge(m) {
  if (!m.live) return badge("starting", t("alarm_waiting"));
  const raised = m.live.alarms_kw || [];
  if (!raised.length) return settling(m) ? badge("starting", t("alarm_settling")) : badge("ok", t("alarm_normal"));
  const top = m.levels_kw.length ? Math.max(...m.levels_kw) : Infinity;
  return badge(Math.max(...raised) >= top ? "bad" : "warn", `${t("alarm_raised")} ≥ ${kw(Math.max(...raised))}`);
}

function liveRows(m, now) {
  const live = m.live;
  if (!live) {
    const why = m.kind === "group" ? t("waiting_group")
      : m.waiting_until ? t("waiting_first")(wallClock(m.waiting_until, true) +
        (zoneNote(m.waiting_until) ? ` (${zoneNote(m.waiting_until)})` : "")) : t("waiting_reading");
    return el("p", { class: "muted waiting" }, why);
  }
  const target = m.target_kw === null || m.target_kw === undefined ? t("no_target")
    : `${kw(m.target_kw)}${m.levels_kw.length ? ` (${t("levels")} ${m.levels_kw.map(kw).join(", ")})` : ""}`;
  const top = m.levels_kw.length ? Math.max(...m.levels_kw) : m.target_kw;
  const scale = el("meter", { min: 0, max: Math.max((top || live.projected_kw) * 1.25, live.projected_kw, 1),
    low: m.levels_kw.length ? Math.min(...m.levels_kw) : null, high: top ?? null, optimum: 0, value: live.projected_kw });
  const zone = zoneNote(live.window_start);
  const windowText = `${wallClock(live.window_start)}–${live.window_end.slice(11, 16)}${zone ? ` (${zone})` : ""}, ` +
    (live.ended ? t("window_ended") : t("left")(duration(live.left_s)));
  const raised = live.alarms_kw || [];
  return el("dl", { class: "live" },
    el("dt", null, t("window")), el("dd", { class: `window${live.ended ? " error-text" : ""}` }, windowText),
    el("dt", null, t("so_far")), el("dd", { class: "so-far" }, `${number(Math.round(live.energy_kwh * 1000) / 1000)} kWh`,
      live.estimated_s > 0 ? el("span", { class: "muted estimated" }, ` (${t("estimated")(duration(live.estimated_s))})`) : null),
    el("dt", null, t("power_now")), el("dd", { class: "power" }, kw(live.power_kw)),
    el("dt", null, t("projected")), el("dd", { class: "projected" }, el("strong", null, kw(live.projected_kw)), " ", scale),
    el("dt", null, t("target")), el("dd", { class: "target" }, target),
    el("dt", null, t("raised")), el("dd", { class: `raised${raised.length ? " error-text" : ""}` },
      raised.length ? raised.map(kw).join(", ")
        : settling(m) ? el("span", { class: "muted settling" }, t("settling")(duration(Math.ceil(live.settling_s)))) : t("none")),
    el("dt", null, t("last_reading")), el("dd", { class: "last-reading" }, when(live.ts, now)));
}

// One <tbody> per window: its figures, then its flags in words on a line of their own (a phone has no room
// for a fifth column of sentences).
function windowsTable(windows) {
  if (!windows.length) return el("p", { class: "muted" }, t("no_windows"));
  const bodies = windows.map((w) => {
    const clean = !(w.flags || []).length && w.coverage >= 0.999;
    return el("tbody", { class: clean ? "" : "flagged", "data-window": w.start },
      el("tr", null,
        el("td", null, wallClock(w.start)),
        el("td", { class: "num demand" }, kw(w.demand_kw)),
        el("td", { class: "num" }, `${number(Math.round(w.energy_kwh * 1000) / 1000)} kWh`),
        el("td", { class: "num" }, `${(100 * w.coverage).toFixed(1)} %`)),
      el("tr", { class: "flags-row" }, el("td", { colspan: 4, class: clean ? "flags muted" : "flags error-text" },
        flagWords(w))));
  });
  const zone = zoneNote(windows[0].start);
  return el("div", { class: "scroll" }, el("table", { class: "windows" },
    el("thead", null, el("tr", null, ...["start", "demand", "energy_kwh", "coverage"].map((k) => el("th", null,
      k === "start" && zone ? `${t(k)} (${zone})` : t(k))))),
    ...bodies));
}

function drawEnergy(energy, now) {
  const section = document.getElementById("energy");
  section.hidden = !energy;
  if (!energy) return;
  const figures = energy.figures || {};
  fields("energy-fields", [
    ...["meters", "windows", "alarms_active"].filter((k) => k in figures).map((k) => [t(k), number(figures[k])]),
    ...extraRows(figures, ["meters", "windows", "alarms_active"]),
  ]);
  const meters = energy.meters || [];
  document.getElementById("energy-meters").replaceChildren(...meters.map((m) => {
    const state = !m.live ? "waiting" : (m.live.alarms_kw || []).length ? "raised" : settling(m) ? "settling" : "normal";
    return el("article", { class: "card meter-energy", "data-meter": m.name, "data-alarm": state },
      el("div", { class: "device-head" },
        el("h3", null, m.name, " ", el("span", { class: "muted kind" },
          m.kind === "group" ? `${t("kind_group")}: ${(m.members || []).join(" + ")}` : t("kind_meter"))),
        el("span", { class: "alarm" }, alarmBadge(m))),
      liveRows(m, now),
      el("h4", null, t("streams")),
      windowsTable(m.windows || []));
  }));
  // Streams of the stage the cards above do not cover (an older agent's page.json, an alarm stream).
  const covered = new Set(meters.map((m) => m.name));
  document.getElementById("energy-streams").replaceChildren(...(energy.streams || [])
    .filter((s) => !covered.has(s.stream.slice(0, s.stream.lastIndexOf("/"))))
    .map((s) => el("div", { class: "stream", "data-stream": s.stream }, el("h3", null, s.stream), pointsTable(s.points))));
}

function draw(data) {
  const now = Date.now();
  const failing = data.devices.filter((d) => d.state === "failing").length;
  const healthy = data.uplink.connected && !failing;
  const overall = document.getElementById("overall");
  overall.className = `badge ${healthy ? "ok" : "failing"}`;
  overall.textContent = healthy ? t("all_ok") : t("attention");
  drawGateway(data, now);
  drawUplink(data.uplink, now);
  drawBuffer(data.buffer);
  drawLines(data.lines || []);
  drawDevices(data.devices, now);
  drawEnergy(data.energy, now);
}

function labels() {
  document.documentElement.lang = lang;
  for (const node of document.querySelectorAll("[data-label]")) node.textContent = t(node.dataset.label);
  document.getElementById("lang").textContent = t("lang_button");
}

async function refresh() {
  timer = null;
  if (inFlight) return;
  inFlight = true;
  try {
    const response = await fetch("page.json", { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    last = await response.json();
    draw(last);
    document.getElementById("offline").hidden = true;
    document.getElementById("updated").textContent = `${t("updated")} ${stamp(new Date()).slice(11)}`;
  } catch (error) {
    document.getElementById("offline").hidden = false;
  } finally {
    inFlight = false;
    schedule();
  }
}

// No requests while the tab is hidden: a forgotten tab on a laptop costs the gateway nothing.
function schedule() {
  if (timer === null && !document.hidden) timer = window.setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden) {
    if (timer !== null) window.clearTimeout(timer);
    timer = null;
  } else if (timer === null && !inFlight) {
    refresh();
  }
});

document.getElementById("lang").addEventListener("click", () => {
  lang = lang === "ko" ? "en" : "ko";
  try { window.localStorage.setItem(LANG_KEY, lang); } catch (e) { /* not kept: fine */ }
  labels();
  if (last) draw(last);
});

labels();
refresh();
