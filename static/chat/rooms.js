// The room list: join a public room, create a room, and keep the list and its unread counts fresh.

import { api } from "./api.js";

const layout = document.querySelector("[data-room-url]");
const roomUrl = (slug) => layout.dataset.roomUrl.replace("__slug__", encodeURIComponent(slug));
const listError = document.getElementById("rooms-error");

// --- joining -------------------------------------------------------------------------------------

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-join]");
  if (!button) return;
  button.disabled = true;
  listError.hidden = true;
  try {
    await api(`/api/rooms/${encodeURIComponent(button.dataset.join)}/join/`, { method: "POST" });
    location.assign(roomUrl(button.dataset.join));
  } catch (error) {
    button.disabled = false;
    listError.textContent = error.message;
    listError.hidden = false;
  }
});

// --- creating ------------------------------------------------------------------------------------

const form = document.getElementById("create-room");
const title = document.getElementById("room-title");
const slug = document.getElementById("room-slug");
const formError = document.getElementById("create-error");
let slugEdited = false;

function slugify(text) {
  return text
    .normalize("NFKD")
    .replace(/[\u0300-\u036f]/g, "")
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, "-")
    .replace(/^-+/, "")
    .slice(0, 50)
    .replace(/-+$/, "");
}

title.addEventListener("input", () => {
  if (!slugEdited) slug.value = slugify(title.value);
});
slug.addEventListener("input", () => {
  slugEdited = slug.value !== "";
});

function fieldProblem() {
  if (!title.value.trim()) return [title, "Give the room a title."];
  if (!slug.validity.valid) {
    return [
      slug,
      "The address needs 1 to 50 lowercase letters, digits or hyphens, " +
        "starting and ending with a letter or digit.",
    ];
  }
  return [null, ""];
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const [field, problem] = fieldProblem();
  for (const input of [title, slug]) input.setAttribute("aria-invalid", String(input === field));
  formError.textContent = problem;
  if (field) {
    field.focus();
    return;
  }
  const submit = form.querySelector("button[type='submit']");
  submit.disabled = true;
  try {
    const room = await api("/api/rooms/", {
      method: "POST",
      body: {
        title: title.value.trim(),
        slug: slug.value,
        visibility: new FormData(form).get("visibility"),
      },
    });
    location.assign(roomUrl(room.slug));
  } catch (error) {
    submit.disabled = false;
    formError.textContent = error.message;
    if (error.status === 409 || error.data?.slug) {
      slug.setAttribute("aria-invalid", "true");
      slug.focus();
    }
  }
});

// --- unread counts, and the list itself ----------------------------------------------------------

let refreshing = false;
let timer = null;
const status = document.getElementById("rooms-status");

// The rooms as this page shows them, in its order (the API's: by slug).
function shownRooms() {
  return [...document.querySelectorAll(".room-row")].map((row) => ({
    slug: row.dataset.slug,
    title: row.querySelector(".room-title").textContent,
    visibility: row.dataset.visibility,
    role: row.dataset.role || null,
  }));
}

function sameRoom(a, b) {
  return (
    a.slug === b.slug &&
    a.title === b.title &&
    a.visibility === b.visibility &&
    (a.role ?? null) === (b.role ?? null)
  );
}

async function refreshList() {
  if (refreshing) return; // one request at a time, however slow the server
  refreshing = true;
  try {
    let rooms;
    try {
      // The rooms this page shows: the API's page that starts where this one does.
      const after = layout.dataset.pageAfter;
      rooms = await api(after ? `/api/rooms/?after=${encodeURIComponent(after)}` : "/api/rooms/");
    } catch (error) {
      // Signed out (here or in another tab): stop asking until the page is loaded again.
      if ((error.status === 401 || error.status === 403) && timer !== null) clearInterval(timer);
      return;
    }
    const shown = shownRooms();
    if (rooms.length !== shown.length || rooms.some((room, i) => !sameRoom(room, shown[i]))) {
      await redrawList(); // a room created, joined, opened, renamed or gone elsewhere
      return;
    }
    for (const room of rooms) {
      const badge = document.querySelector(`[data-unread-for="${CSS.escape(room.slug)}"]`);
      if (!badge) continue;
      badge.querySelector(".unread-count").textContent = String(room.unread ?? 0);
      badge.hidden = !room.unread;
    }
  } finally {
    refreshing = false;
  }
}

// The list drawn again from the page the server renders now (one template for its rows), focus
// kept on the same room's link or button, and the rooms that came or went said.
async function redrawList() {
  let response;
  try {
    response = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
  } catch {
    return; // the server is away: the next refresh tries again
  }
  // Signed out, the page is the sign-in form's (a redirect): the next API call says so.
  if (!response.ok || response.redirected) return;
  const fresh = new DOMParser()
    .parseFromString(await response.text(), "text/html")
    .querySelector(".rooms-main");
  if (!fresh) return;
  const main = document.querySelector(".rooms-main");
  const before = shownRooms();
  const focus = focusedControls(main);
  fresh.querySelector("#rooms-error")?.replaceWith(listError); // a join's error stays shown
  main.replaceChildren(...fresh.childNodes);
  if (focus.length) {
    const found = focus.map((selector) => main.querySelector(selector)).find(Boolean);
    (found ?? document.getElementById("rooms-heading")).focus();
  }
  const after = shownRooms();
  const slugs = (rooms) => new Set(rooms.map((room) => room.slug));
  const [was, is] = [slugs(before), slugs(after)];
  const came = after.filter((room) => !was.has(room.slug)).map((room) => room.title);
  const went = before.filter((room) => !is.has(room.slug)).map((room) => room.title);
  const said = [];
  if (came.length) said.push(`${titled(came)} added to the list.`);
  if (went.length) said.push(`${titled(went)} no longer in the list.`);
  if (said.length) status.textContent = said.join(" ");
}

// Up to three rooms by title, more as a count.
function titled(titles) {
  if (titles.length > 3) return `${titles.length} rooms`;
  return titles.join(", ");
}

// Selectors, best first, to find the control of the list that has focus after a redraw: the
// same room's Join button or link (a room joined elsewhere has no Join button any more: its link
// then), or the same pager link; else the heading. None when focus is outside the list.
function focusedControls(main) {
  const focused = document.activeElement;
  if (!focused || !main.contains(focused)) return [];
  const row = focused.closest(".room-row");
  if (row) {
    const room = `.room-row[data-slug="${CSS.escape(row.dataset.slug)}"]`;
    const link = `${room} .room-link`;
    return focused.matches("[data-join]") ? [`${room} [data-join]`, link] : [link];
  }
  if (focused.matches(".pager a")) {
    return [`.pager a[href="${CSS.escape(focused.getAttribute("href"))}"]`];
  }
  return ["#rooms-heading"];
}

// Coming back to the list (back button, another tab) shows counts as they are now.
window.addEventListener("pageshow", (event) => {
  if (event.persisted) refreshList();
});
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") refreshList();
});
// And while the list is shown, every CHAT_UNREAD_REFRESH_SECONDS (a hidden tab asks nothing).
const refreshMs = Number(layout.dataset.unreadRefreshMs) || 0;
if (refreshMs > 0) {
  timer = setInterval(() => {
    if (document.visibilityState === "visible") refreshList();
  }, refreshMs);
}
