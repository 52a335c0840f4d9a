// The tipsen page: plain JavaScript, no build step, no network beyond this service.
"use strict";

const TEXT = {
  ko: {
    pageTitle: "추억 그림 만들기", title: "추억 그림 만들기", langButton: "English",
    keyLabel: "접속 열쇠를 입력해 주세요", keyHelp: "관리자에게 받은 열쇠예요. 이 창을 닫을 때까지 기억해요.",
    keySave: "확인",
    promptLabel: "떠올리고 싶은 장면을 적어 주세요", promptHelp: "예: 김장하는 날, 온 가족이 모여 김치를 담갔어요",
    make: "그림 만들기", wait: "그림을 그리고 있어요. 잠시만 기다려 주세요.", elapsed: (s) => `${s}초 지났어요.`,
    resultTitle: "완성된 그림", done: "그림이 완성됐어요.", save: "그림 저장하기", again: "다른 그림으로 다시 그리기",
    another: "새 그림 만들기", details: "자세히 보기", refinedLabel: "그림에 쓴 영어 설명", keywordLabel: "주제",
    seedLabel: "그림 번호(시드)", none: "없음",
    chipsTitle: "이런 주제를 잘 그려요", chipsHelp: "누르면 주제를 더하고, 다시 누르면 빼요.",
    shapeLabel: "그림 모양", shapeSquare: "네모반듯하게", shapeLandscape: "가로로 넓게", shapePortrait: "세로로 길게",
    notReady: "준비 중", routeTo: (kw) => `${kw.ko} (${kw.keyword})${particle(kw.ko)} 그릴게요.`,
    routeOff: (kw) => `${kw.ko} 주제는 지금 쓸 수 없어서, 기본 그림으로 그릴게요.`,
    routeNone: "적어 주신 대로 그릴게요.",
    routeAsk: (kw) => `${kw.ko}${objectParticle(kw.ko)} 그릴까요? 그렇다면 아래 '${kw.ko}'${objectParticle(kw.ko)} 눌러 주세요.`,
    routeAlso: (names) => `${names}도 함께 그려요.`,
    routePicked: (names) => `${names}도 함께 그려요.`,
    routeFull: (n) => `주제는 ${n}가지까지 고를 수 있어요.`,
    alt: (words, kw) => `${kw ? `${kw.ko} 그림` : "그림"}: ${words}`,
    privacy: "적어 주신 글과 만든 그림은 보여 드린 뒤 어디에도 남기지 않아요.",
    errors: {
      empty: "떠올리고 싶은 장면을 먼저 적어 주세요.",
      busy: "지금은 그림을 그리는 분이 많아요. 잠시 후에 다시 눌러 주세요.",
      timeout: "그림이 너무 오래 걸리고 있어요. 잠시 후에 다시 눌러 주세요.",
      input: "적어 주신 글을 그림으로 만들 수 없었어요. 글을 조금 바꿔서 다시 해 주세요.",
      notopic: "어떤 주제인지 알아듣지 못했어요. 아래 주제 가운데 하나를 눌러 주세요.",
      auth: "접속 열쇠가 필요해요. 위 칸에 열쇠를 넣고 확인을 눌러 주세요.",
      failed: "그림을 만들지 못했어요. 잠시 후에 다시 해 주세요.",
    },
  },
  en: {
    pageTitle: "Memory picture maker", title: "Memory picture maker", langButton: "한국어",
    keyLabel: "Enter the access key", keyHelp: "The key from your administrator. It is kept until you close this tab.",
    keySave: "OK",
    promptLabel: "Write the scene you want to recall",
    promptHelp: "For example: the Gimjang day, when the whole family made kimchi together",
    make: "Make the picture", wait: "Drawing your picture. Please wait a moment.",
    elapsed: (s) => `${s} seconds so far.`,
    resultTitle: "Your picture", done: "Your picture is ready.", save: "Save the picture",
    again: "Draw it again differently", another: "Make a new picture", details: "Show details",
    refinedLabel: "English description used", keywordLabel: "Topic", seedLabel: "Picture number (seed)",
    none: "none", chipsTitle: "Topics I draw well", chipsHelp: "Tap one to add it; tap it again to take it out.",
    shapeLabel: "Picture shape", shapeSquare: "Square", shapeLandscape: "Wide", shapePortrait: "Tall",
    notReady: "not available", routeTo: (kw) => `I'll draw it as ${kw.keyword} (${kw.ko}).`,
    routeOff: (kw) => `${kw.keyword} is not available now, so I'll draw a plain picture.`,
    routeNone: "I'll draw it as you wrote it.",
    routeAsk: (kw) => `Shall I draw ${kw.keyword}? If so, tap '${kw.keyword}' below.`,
    routeAlso: (names) => `I will draw ${names} in it too.`,
    routePicked: (names) => `I will draw ${names} in it too.`,
    routeFull: (n) => `You can choose up to ${n} topics.`,
    alt: (words, kw) => `${kw ? `Picture of ${kw.keyword}` : "Picture"}: ${words}`,
    privacy: "What you write and the pictures made from it are not kept anywhere after they are shown to you.",
    errors: {
      empty: "Please write the scene you want to recall first.",
      busy: "Many pictures are being drawn right now. Please try again in a moment.",
      timeout: "The picture is taking too long. Please try again in a moment.",
      input: "This text could not be turned into a picture. Please change it a little and try again.",
      notopic: "I could not tell which topic this is. Please tap one of the topics below.",
      auth: "An access key is needed. Enter it in the box above and press OK.",
      failed: "The picture could not be made. Please try again in a moment.",
    },
  },
};
const GENERATE_TIMEOUT_MS = 180000;
const $ = (id) => document.getElementById(id);
let lang = sessionStorage.getItem("tipsen-lang") === "en" ? "en" : "ko";
let keywords = [];
let route = null;
const NO_TOPIC = "prompt: no topic was recognised";  // the service's words for Korean it cannot draw
let picked = null;  // the keywords the senior chose with the chips, sent as `keywords`; null: follow the hint
let maxKeywords = 3;  // the service's generate.max_keywords, from /keywords
let shapes = null;  // {square, landscape, portrait}: [width, height] at the model's size, from /keywords
let lastPrompt = "";
let lastResult = null;  // the picture shown: its alt text follows the page's language
let working = false;
let pending = null;  // the action to retry once the access key is entered

// "김장" + 으로, "송편" + 으로, "약과" + 로: the particle follows the last syllable's final consonant.
function particle(word) {
  const code = word.charCodeAt(word.length - 1) - 0xac00;
  if (code < 0 || code > 11171) return "로";
  const final = code % 28;
  return final === 0 || final === 8 ? "로" : "으로";
}

// "약과" + 를, "약식" + 을: the object particle follows the last syllable's final consonant too.
function objectParticle(word) {
  const code = word.charCodeAt(word.length - 1) - 0xac00;
  return code >= 0 && code <= 11171 && code % 28 ? "을" : "를";
}

function t(key) { return TEXT[lang][key]; }

class Problem extends Error {
  constructor(kind) { super(kind); this.kind = kind; }
}

async function call(path, { method = "GET", body, timeout = 15000, askKey = true } = {}) {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("tipsen-key");
  if (key) headers.Authorization = `Bearer ${key}`;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeout);
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body && JSON.stringify(body), signal: abort.signal });
  } catch (err) {
    throw new Problem(err.name === "AbortError" ? "timeout" : "failed");
  } finally {
    clearTimeout(timer);
  }
  if (resp.status === 401) {
    if (askKey) showKeyForm();
    throw new Problem("auth");
  }
  if (resp.status === 429 || resp.status === 503) throw new Problem("busy");
  if (resp.status === 504) throw new Problem("timeout");
  if (resp.status >= 400 && resp.status < 500) {
    const error = await resp.json().then((b) => String(b.error || ""), () => "");
    throw new Problem(error.startsWith(NO_TOPIC) ? "notopic" : "input");
  }
  if (!resp.ok) throw new Problem("failed");
  try { return await resp.json(); } catch { throw new Problem("failed"); }
}

function showError(kind) {
  $("error").dataset.kind = kind || "";
  $("error").textContent = kind ? TEXT[lang].errors[kind] || TEXT[lang].errors.failed : "";
}

function showKeyForm() {
  $("key-form").hidden = false;
  $("key").focus();
}

function applyLang() {
  document.documentElement.lang = lang;
  document.title = t("pageTitle");
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  const button = $("lang");
  button.textContent = t("langButton");  // named in the language it switches to
  button.lang = lang === "ko" ? "en" : "ko";
  renderChips();
  renderRoute();
  showError($("error").dataset.kind);
  if (lastResult) describePicture(lastResult);
}

// The picture's alt text, in the page's language: its topic and the senior's own words (the English prompt
// SDXL read is under "자세히 보기").
function describePicture(out) {
  $("picture").alt = t("alt")(out.original, byslug(out.keyword));
}

function renderChips() {
  const box = $("chips");
  box.replaceChildren();
  for (const kw of keywords) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.dataset.slug = kw.slug;
    chip.textContent = lang === "ko" ? kw.ko : kw.keyword;
    chip.setAttribute("aria-pressed", String(drawn().includes(kw.slug)));
    if (!kw.available) {
      chip.setAttribute("aria-disabled", "true");
      chip.textContent += ` (${t("notReady")})`;
      chip.title = kw.reason || "";
    }
    chip.addEventListener("click", () => pickKeyword(kw));
    box.append(chip);
  }
}

// The keywords the picture is for, the first drawn: the senior's own choice, else the routed ones.
function drawn() {
  if (picked) return picked;
  return route && route.slug ? [route.slug, ...route.also] : [];
}

function byslug(slug) { return keywords.find((kw) => kw.slug === slug); }

function renderRoute() {
  const hint = $("route");
  const names = (slugs) => slugs.map(byslug).filter(Boolean).map((kw) => (lang === "ko" ? kw.ko : kw.keyword));
  if (picked) {
    const [first, ...rest] = picked;
    hint.textContent = first ? t("routeTo")(byslug(first)) : t("routeNone");
    if (rest.length) hint.textContent += " " + t("routePicked")(names(rest).join(", "));
  } else if (!$("prompt").value.trim() || route === null) { hint.textContent = ""; }
  else if (!route.slug) {
    const asked = route.ask.map(byslug).find((kw) => kw && kw.available);
    hint.textContent = asked ? t("routeAsk")(asked) : t("routeNone");
  } else {
    hint.textContent = route.available ? t("routeTo")(route) : t("routeOff")(route);
    const also = names(route.also);
    if (also.length) hint.textContent += " " + t("routeAlso")(also.join(", "));
  }
  for (const chip of $("chips").children) {
    chip.setAttribute("aria-pressed", String(drawn().includes(chip.dataset.slug)));
  }
}

// With an empty box a chip writes its name there; otherwise it adds its keyword to the picture's keywords, or,
// pressed again, takes it out (so the hint's question is answered by pressing the chip it names).
function pickKeyword(kw) {
  if (!kw.available) return;
  if (!$("prompt").value.trim()) { insertKeyword(kw); return; }
  const now = drawn();
  if (now.includes(kw.slug)) picked = now.filter((slug) => slug !== kw.slug);
  else if (now.length >= maxKeywords) { $("route").textContent = t("routeFull")(maxKeywords); return; }
  else picked = [...now, kw.slug];
  renderRoute();
}

function insertKeyword(kw) {
  if (!kw.available) return;
  const box = $("prompt");
  const name = lang === "ko" ? kw.ko : kw.keyword;
  const at = box.selectionStart ?? box.value.length;
  const before = box.value.slice(0, at), after = box.value.slice(at);
  const text = `${before}${before && !before.endsWith(" ") ? " " : ""}${name}${after && !after.startsWith(" ") ? " " : ""}`;
  box.value = text + after;
  box.focus();
  box.setSelectionRange(text.length, text.length);
  updateRoute();
}

let routeTimer = null;
function updateRoute() {
  clearTimeout(routeTimer);
  routeTimer = setTimeout(async () => {
    const text = $("prompt").value.trim();
    if (!text) { route = null; picked = null; renderRoute(); return; }
    try {
      route = await call(`/route?text=${encodeURIComponent(text.slice(0, 1000))}`, { askKey: false });
    } catch {
      route = null;  // the hint is a courtesy: the server routes again when drawing
    }
    renderRoute();
  }, 250);
}

async function loadKeywords(tries = 20) {
  try {
    const bank = await call("/keywords");
    keywords = bank.keywords;
    maxKeywords = bank.max_keywords;
    shapes = bank.shapes || null;
    $("shapes").hidden = !shapes;
    renderChips();
  } catch (err) {
    if (err.kind === "busy" && tries > 0) setTimeout(() => loadKeywords(tries - 1), 3000);  // still loading
  }
}

function setWorking(on) {
  working = on;
  $("make").setAttribute("aria-disabled", String(on));
  $("progress").hidden = !on;
  if (!on) return;
  const started = Date.now();
  $("progress-text").textContent = t("wait");
  $("elapsed").textContent = "";
  const tick = setInterval(() => {
    if (!working) { clearInterval(tick); return; }
    $("elapsed").textContent = t("elapsed")(Math.round((Date.now() - started) / 1000));
  }, 1000);
}

async function make(prompt) {
  if (working) return;
  showError(null);
  if (!prompt) {
    showError("empty");
    $("prompt").focus();
    return;
  }
  lastPrompt = prompt;
  setWorking(true);
  try {
    const body = picked ? { prompt, keywords: picked } : { prompt };
    const shape = document.querySelector('input[name="shape"]:checked').value;  // one radio group: one Tab stop
    if (shapes && shapes[shape]) [body.width, body.height] = shapes[shape];
    const out = await call("/generate", { method: "POST", body, timeout: GENERATE_TIMEOUT_MS });
    showResult(out);
  } catch (err) {
    if (err.kind === "auth") pending = () => make(prompt);
    showError(err.kind);
  } finally {
    setWorking(false);
  }
}

function showResult(out) {
  const url = `data:image/png;base64,${out.images[0]}`;
  const img = $("picture");
  img.src = url;
  lastResult = out;
  describePicture(out);
  img.width = out.width;
  img.height = out.height;
  $("save").href = url;
  $("save").download = `tipsen-${out.seed}.png`;
  $("refined").textContent = out.prompt;
  const kw = keywords.find((k) => k.slug === out.keyword);
  $("used-keyword").textContent = kw ? `${kw.ko} (${kw.keyword})` : out.keyword || t("none");
  $("used-seed").textContent = String(out.seed);
  $("result").hidden = false;
  $("progress-text").textContent = t("done");
  // the whole result in view, the save button included (a 1280x800 screen), then focus on its title
  $("result").scrollIntoView({ block: "start" });
  $("result-title").focus({ preventScroll: true });
}

document.addEventListener("DOMContentLoaded", () => {
  $("make-form").addEventListener("submit", (ev) => { ev.preventDefault(); make($("prompt").value.trim()); });
  $("prompt").addEventListener("input", updateRoute);
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); make($("prompt").value.trim()); }
  });
  $("again").addEventListener("click", () => make(lastPrompt));
  $("another").addEventListener("click", () => {
    $("result").hidden = true;
    $("prompt").value = "";
    route = null;
    picked = null;
    renderRoute();
    $("prompt").focus();
  });
  $("lang").addEventListener("click", () => {
    lang = lang === "ko" ? "en" : "ko";
    sessionStorage.setItem("tipsen-lang", lang);
    applyLang();
  });
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem("tipsen-key", key);
    $("key").value = "";
    $("key-form").hidden = true;
    showError(null);
    loadKeywords();
    const retry = pending;
    pending = null;
    if (retry) retry();
    else $("prompt").focus();
  });
  applyLang();
  loadKeywords();
});
