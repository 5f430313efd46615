// The room list: join a public room, create a room, and keep unread counts fresh.

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

// --- unread counts -------------------------------------------------------------------------------

let refreshing = false;
let timer = null;

async function refreshUnread() {
  if (refreshing) return; // one request at a time, however slow the server
  refreshing = true;
  let rooms;
  try {
    // The rooms this page shows: the API's page that starts where this one does.
    const after = layout.dataset.pageAfter;
    rooms = await api(after ? `/api/rooms/?after=${encodeURIComponent(after)}` : "/api/rooms/");
  } catch (error) {
    // Signed out (here or in another tab): stop asking until the page is loaded again.
    if ((error.status === 401 || error.status === 403) && timer !== null) clearInterval(timer);
    return;
  } finally {
    refreshing = false;
  }
  for (const room of rooms) {
    const badge = document.querySelector(`[data-unread-for="${CSS.escape(room.slug)}"]`);
    if (!badge) continue;
    badge.querySelector(".unread-count").textContent = String(room.unread ?? 0);
    badge.hidden = !room.unread;
  }
}

// Coming back to the list (back button, another tab) shows counts as they are now.
window.addEventListener("pageshow", (event) => {
  if (event.persisted) refreshUnread();
});
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") refreshUnread();
});
// And while the list is shown, every CHAT_UNREAD_REFRESH_SECONDS (a hidden tab asks nothing).
const refreshMs = Number(layout.dataset.unreadRefreshMs) || 0;
if (refreshMs > 0) {
  timer = setInterval(() => {
    if (document.visibilityState === "visible") refreshUnread();
  }, refreshMs);
}
